"""Ingest against the real tansu broker, a real DuckDB file and a real Prefect server."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from tuneloop.runtime.settings import Settings
from tuneloop.services.demo import banking77
from tuneloop.services.feedback.contract import FeedbackEvent
from tuneloop.services.feedback.topics import ensure_topics, topic_offsets, under_replicated
from tuneloop.services.ingest.consumer import IngestConsumer
from tuneloop.services.ingest.core import PreparedBatch
from tuneloop.services.store.database import Store

pytestmark = pytest.mark.integration


def _events(n: int, seed: int = 0) -> list[FeedbackEvent]:
    queries = banking77.load("train")
    picked = [queries[i % len(queries)] for i in range(n)]
    return list(banking77.to_events(picked, seed=seed))


def _malformed(i: int, event: FeedbackEvent) -> bytes:
    """A mix of the ways real apps get events wrong."""
    data = json.loads(event.to_json_bytes())
    kind = i % 5
    if kind == 0:
        return b"{truncated json"
    if kind == 1:
        data["rating"] = 7
    elif kind == 2:
        del data["messages"]
    elif kind == 3:
        data["schema_version"] = 2
    else:
        data["metadata"] = {"blob": "x" * 70_000}
    return json.dumps(data).encode()


def _send_raw(settings: Settings, payloads: list[tuple[bytes | None, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all",
                             linger_ms=5, max_request_size=2 * 1024 * 1024)
    for key, value in payloads:
        producer.send(settings.kafka.topic, key=key, value=value)
    producer.flush()
    producer.close()


def _mixed_traffic(settings: Settings, total: int) -> tuple[set[str], int]:
    """Send ``total`` events: 5% duplicates, 3% malformed; returns (valid ids, malformed)."""
    n_dup, n_bad = total * 5 // 100, total * 3 // 100
    valid = _events(total - n_dup - n_bad)
    rng = random.Random(7)
    payloads: list[tuple[bytes | None, bytes]] = [
        (str(e.event_id).encode(), e.to_json_bytes()) for e in valid
    ]
    payloads += [(str(e.event_id).encode(), e.to_json_bytes()) for e in rng.sample(valid, n_dup)]
    payloads += [(None, _malformed(i, valid[i])) for i in range(n_bad)]
    rng.shuffle(payloads)
    _send_raw(settings, payloads)
    return {str(e.event_id) for e in valid}, n_bad


def _feedback_ids(store: Store) -> list[str]:
    with store.connect() as con:
        return [r[0] for r in con.execute("SELECT event_id FROM feedback").fetchall()]


def test_duplicates_and_malformed_events(broker: Settings, settings: Settings, store: Store) -> None:
    ensure_topics(settings.kafka)
    valid_ids, n_bad = _mixed_traffic(settings, 10_000)
    # Valid JSON that no UTF-8 column can hold (a lone surrogate): once, this crashed the
    # consumer and stalled its partition.
    poison = _events(1)[0]
    _send_raw(settings, [(str(poison.event_id).encode(), poison.to_json_bytes().replace(
        b'"content":"', b'"content":"\\ud800', 1))])
    n_bad += 1

    consumer = IngestConsumer(settings, store)
    try:
        stats = consumer.run()
    finally:
        consumer.close()

    ids = _feedback_ids(store)
    assert len(ids) == len(set(ids)) == len(valid_ids)
    assert set(ids) == valid_ids
    with store.connect() as con:
        dead = con.execute("SELECT reason, source_offset FROM dead_letters").fetchall()
    assert len(dead) == n_bad == stats.dead_letters
    reasons = " | ".join(r for r, _ in dead)
    for fragment in ("not valid UTF-8 JSON", "rating", "messages", "schema_version=2", "byte cap",
                     "cannot be stored"):
        assert fragment in reasons
    # The dead-letter topic holds them too, with the reason in a header.
    dlq = topic_offsets(settings.kafka, settings.kafka.dlq_topic, None)
    assert sum(p.end for p in dlq) == n_bad
    # Every offset is committed: nothing left to replay.
    assert all(p.lag == 0 for p in topic_offsets(settings.kafka, settings.kafka.topic,
                                                 settings.kafka.group_id))


def _ingest_process(settings: Settings, batch_size: int,
                    **more_env: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TUNELOOP_HOME": str(settings.home),
        "TUNELOOP_KAFKA__TOPIC": settings.kafka.topic,
        "TUNELOOP_KAFKA__DLQ_TOPIC": settings.kafka.dlq_topic,
        "TUNELOOP_KAFKA__GROUP_ID": settings.kafka.group_id,
        "TUNELOOP_INGEST__BATCH_SIZE": str(batch_size),
        **more_env,
    }
    code = ("from tuneloop.services.ingest.consumer import IngestConsumer;"
            "from tuneloop.runtime.settings import load_settings;"
            "c = IngestConsumer(load_settings()); c.run(); c.close()")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def test_sigkill_mid_batch_loses_and_doubles_nothing(
    broker: Settings, settings: Settings, store: Store
) -> None:
    ensure_topics(settings.kafka)
    valid_ids, _ = _mixed_traffic(settings, 6000)

    proc = _ingest_process(settings, batch_size=200)
    # Kill once some batches are committed but well before the end: mid-stream, with a
    # batch in flight. Progress is read from the committed offsets, not the store,
    # so the watcher never waits on the ingest process's hold of the DuckDB file.
    deadline = time.monotonic() + 120
    committed = 0
    while time.monotonic() < deadline and proc.poll() is None:
        parts = topic_offsets(settings.kafka, settings.kafka.topic, settings.kafka.group_id)
        committed = sum(p.committed or 0 for p in parts)
        if committed >= 1000:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    total = sum(p.end for p in topic_offsets(settings.kafka, settings.kafka.topic, None))
    assert 1000 <= committed < total

    # The killed member's session expires (6 s); a fresh process takes over.
    restarted = _ingest_process(settings, batch_size=200)
    assert restarted.wait(timeout=180) == 0, restarted.stderr.read().decode() if restarted.stderr else ""

    ids = _feedback_ids(store)
    assert len(ids) == len(set(ids))
    assert set(ids) == valid_ids


def test_slow_batch_keeps_its_partitions(broker: Settings, settings: Settings, store: Store) -> None:
    ensure_topics(settings.kafka)
    events = _events(900)
    _send_raw(settings, [(str(e.event_id).encode(), e.to_json_bytes()) for e in events])
    slept: list[int] = []

    def slow(batch: PreparedBatch) -> None:
        if not slept:  # the first batch takes longer than the session timeout
            slept.append(len(batch.rows))
            time.sleep(settings.kafka.session_timeout_ms / 1000 + 4)

    consumer = IngestConsumer(settings.model_copy(update={
        "ingest": settings.ingest.model_copy(update={"batch_size": 300})}), store)
    try:
        stats = consumer.run(on_batch=slow)
    finally:
        consumer.close()
    assert slept
    assert stats.commit_failures == 0
    # No rebalance: every batch saw the same assignment, and nothing was polled twice.
    assert len({tuple(a) for a in stats.assignments}) == 1
    assert stats.polled == len(events)
    assert set(_feedback_ids(store)) == {str(e.event_id) for e in events}


def test_outbox_carries_events_across_a_broker_outage(tmp_path: Path, settings: Settings,
                                                      store: Store) -> None:
    from tuneloop.infra.broker import EmbeddedBroker
    from tuneloop.runtime.processes import free_port
    from tuneloop.services.feedback.producer import FeedbackProducer

    # A broker of its own: this test stops it.
    own = settings.model_copy(update={
        "kafka": settings.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}"}),
        "producer": settings.producer.model_copy(update={"delivery_timeout_s": 2.0}),
    })
    broker = EmbeddedBroker(own)
    broker.start()
    ensure_topics(own.kafka)
    before, during = _events(300, seed=1), _events(300, seed=2)
    try:
        with FeedbackProducer(own) as producer:
            producer.send_many(before)
            assert producer.flush(10).complete
            broker.stop()
            # The app keeps sending while the broker is down: accepted, kept in the outbox.
            for event in during:
                producer.send(event)
            report = producer.flush(3)
            assert report.pending == len(during)
            # The embedded broker held `before` in memory: gone with it (see README).
            broker.start()
            ensure_topics(own.kafka)
            report = producer.flush(30)
            assert report.complete and report.delivered == len(during)
        consumer = IngestConsumer(own, store)
        try:
            consumer.run()
        finally:
            consumer.close()
    finally:
        broker.stop()
    assert set(_feedback_ids(store)) == {str(e.event_id) for e in during}


def test_outbox_survives_a_producer_restart(settings: Settings) -> None:
    from tuneloop.runtime.processes import free_port
    from tuneloop.services.feedback.producer import FeedbackProducer

    unreachable = settings.model_copy(update={
        "kafka": settings.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}"}),
        "producer": settings.producer.model_copy(update={"delivery_timeout_s": 1.0}),
    })
    events = _events(20, seed=3)
    with FeedbackProducer(unreachable) as producer:
        producer.send_many(events)
        assert producer.flush(1).pending == 20
    # A new process finds them, in the order they were accepted.
    with FeedbackProducer(unreachable) as producer:
        assert [eid for _, eid, _ in producer.outbox.head(100)] == [str(e.event_id) for e in events]


def test_a_record_the_broker_refuses_is_set_aside_and_the_outbox_moves_on(
        broker: Settings, settings: Settings) -> None:
    """A record too large for the Kafka client once stayed at the head of its outbox
    forever (every drain failed on it), and everything behind it waited. Now it is moved to
    the outbox's ``refused`` table with the reason, and the rest are delivered."""
    from kafka import KafkaConsumer

    from tuneloop.services.feedback.producer import FeedbackProducer

    ensure_topics(settings.kafka, extra=("shadow-test",))
    # A limit above the client's 1 MiB request limit lets the outbox take the big record,
    # as an outbox written before the limit existed holds one.
    loose = settings.model_copy(update={"producer": settings.producer.model_copy(
        update={"max_record_bytes": 4 * 1024 * 1024, "delivery_timeout_s": 3.0})})
    with FeedbackProducer(loose, topic="shadow-test",
                          outbox_path=settings.home / "shadow.sqlite") as producer:
        producer.send_record("first", b"{}")
        producer.send_record("huge", b"x" * (2 * 1024 * 1024))
        producer.send_record("after", b"{}")
        report = producer.flush(20)
        assert report.complete and report.delivered == 2
        assert [eid for eid, _ in producer.outbox.refused()] == ["huge"]
        assert "MessageSizeTooLarge" in producer.outbox.refused()[0][1]
    topic = KafkaConsumer("shadow-test", bootstrap_servers=settings.kafka.bootstrap_servers,
                          auto_offset_reset="earliest", consumer_timeout_ms=5000)
    assert sorted(m.key for m in topic) == [b"after", b"first"]  # keys spread over partitions
    topic.close()


def test_two_processes_share_the_store_without_losing_writes(settings: Settings, store: Store) -> None:
    """Two writer processes and this reader contend for the DuckDB file; nothing fails or is lost."""
    writer = (
        "import sys; from pathlib import Path; from tuneloop.services.demo import banking77;"
        "from tuneloop.services.ingest.store import insert_events;"
        "from tuneloop.services.store.database import Store;"
        "s = Store(Path(sys.argv[1])); seed = int(sys.argv[2]);"
        "qs = banking77.load('train');"
        "evs = list(banking77.to_events(qs[:1500], seed=seed));\n"
        "for i in range(0, 1500, 50):\n"
        "    with s.connect() as con:\n"
        "        insert_events(con, evs[i:i + 50])\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(store.path), str(seed)],
                              stderr=subprocess.PIPE) for seed in (11, 12)]
    reads = 0
    while any(p.poll() is None for p in procs):
        store.counts()
        reads += 1
        time.sleep(0.05)
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode() if p.stderr else ""
    assert reads > 0
    assert store.counts()["feedback"] == 3000


def test_ingest_flow_on_the_prefect_server(broker: Settings, prefect_server: str, settings: Settings,
                                           store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client

    # The flow loads settings itself, as a deployment run would: point it at this test's topic.
    for key, value in {
        "TUNELOOP_HOME": str(settings.home), "TUNELOOP_KAFKA__TOPIC": settings.kafka.topic,
        "TUNELOOP_KAFKA__DLQ_TOPIC": settings.kafka.dlq_topic,
        "TUNELOOP_KAFKA__GROUP_ID": settings.kafka.group_id,
    }.items():
        monkeypatch.setenv(key, value)
    from tuneloop.flows.ingest import ingest

    ensure_topics(settings.kafka)
    events = _events(500, seed=5)
    _send_raw(settings, [(str(e.event_id).encode(), e.to_json_bytes()) for e in events])
    state = ingest(return_state=True)
    stats = state.result()
    assert stats["inserted"] == 500
    assert len(_feedback_ids(store)) == 500

    async def runs() -> list[str]:
        async with get_client() as client:
            found = await client.read_flow_runs()
            return [r.state_name for r in found if r.id == state.state_details.flow_run_id]

    import asyncio

    assert asyncio.run(runs()) == ["Completed"]


def test_topics_below_the_configured_replication_are_reported(broker: Settings,
                                                                settings: Settings) -> None:
    """The embedded broker is one node, so its topics have one replica: with settings that
    ask for three (as for an external cluster), each of tuneloop's topics is named."""
    ensure_topics(settings.kafka)
    assert under_replicated(settings.kafka) == []
    wanted = settings.kafka.model_copy(update={"replication_factor": 3})
    problems = under_replicated(wanted)
    assert len(problems) == 2
    assert all("1 replica(s), below kafka.replication_factor=3" in p for p in problems)
    assert {settings.kafka.topic, settings.kafka.dlq_topic} == {p.split()[1] for p in problems}


def test_the_embedded_broker_speaks_kafka(broker: Settings) -> None:
    from tuneloop.infra.broker import EmbeddedBroker, speaks_kafka

    own = EmbeddedBroker(broker)
    assert speaks_kafka(own.host, own.port) and own.healthy()


def test_a_200k_backlog_leaves_drift_curation_and_status_their_turns(
        broker: Settings, settings: Settings, store: Store) -> None:
    """While ingest works through 200,000 events of backlog, the store units of drift
    (its two windows), curation (the candidates since the last version) and status (the
    counts) keep getting the file in turn: a store that gives up after 20 s never does,
    and each of them has its turn while the backlog is part-way through."""
    from tuneloop.services.curation.store import load_candidates
    from tuneloop.services.drift.store import NotEnoughEvents, load_windows

    ensure_topics(settings.kafka)
    n = 200_000
    _send_raw(settings, [(str(e.event_id).encode(), e.to_json_bytes()) for e in _events(n)])
    impatient = Store(store.path, lock_timeout_s=20)
    def drift(con: Any) -> None:
        with contextlib.suppress(NotEnoughEvents):  # before the first batch lands
            load_windows(con, settings.drift, settings.serving.alias)

    units = {"drift": drift,
             "curate": lambda con: load_candidates(con),
             "status": lambda con: [con.execute(f"SELECT count(*) FROM {t}").fetchall()
                                    for t in ("feedback", "dead_letters", "datasets")]}
    turns = {name: 0 for name in units}  # taken while ingest was part-way through
    waits: list[float] = []
    # Ingest keeps the file across batches for at most store.max_hold_s, then lets the
    # waiters in. A shorter hold than the default 2 s gives this backlog more hand-overs
    # on a fast machine; the order of turns is the same.
    proc = _ingest_process(settings, batch_size=5000, TUNELOOP_STORE__MAX_HOLD_S="0.5")
    try:
        landed = 0
        while landed < n and proc.poll() is None:
            for name, unit in units.items():
                asked = time.monotonic()
                with impatient.connect() as con:  # raises StoreBusyError after 20 s
                    waits.append(time.monotonic() - asked)
                    unit(con)
                    # Counted inside the turn: ingest cannot write while this unit holds
                    # the file, so this is how far the backlog was when the turn came.
                    (landed,) = con.execute("SELECT count(*) FROM feedback").fetchone()
                turns[name] += 0 < landed < n
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"turns while ingest was part-way: {turns}; longest wait {max(waits):.2f} s")  # noqa: T201
    assert all(t >= 1 for t in turns.values()), turns
    assert len(set(_feedback_ids(store))) == n


def test_a_record_of_any_size_or_encoding_becomes_a_publishable_dead_letter(
        broker: Settings, settings: Settings, store: Store) -> None:
    """Binary and Latin-1 records of 0.5, 1 and 5 MB: each invalid byte reads as three,
    so the dead letter once outgrew the producer's 1 MiB request limit, its publish failed
    before the offset commit, and ingest replayed the batch forever. A dead letter keeps
    at most KEPT_BYTES of the record, with its size and checksum."""
    import hashlib

    from kafka import KafkaConsumer

    from tuneloop.services.ingest.core import KEPT_BYTES

    ensure_topics(settings.kafka)
    rng = random.Random(3)
    records = []
    for mb in (0.5, 1, 5):
        n = int(mb * 1024 * 1024)
        records.append(bytes(rng.getrandbits(8) for _ in range(n // 64)) * 64)  # binary
        records.append(("Grüße aus Köln, café crème: " * (n // 28 + 1)).encode("latin-1")[:n])
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all",
                             max_request_size=8 * 1024 * 1024)
    for value in records:
        producer.send(settings.kafka.topic, value=value)
    producer.flush()
    producer.close()

    consumer = IngestConsumer(settings, store)
    try:
        stats = consumer.run()
    finally:
        consumer.close()

    assert stats.dead_letters == len(records)
    with store.connect() as con:
        dead = con.execute("SELECT size, sha256, truncated, octet_length(payload), reason "
                           "FROM dead_letters ORDER BY source_offset").fetchall()
    # Offsets count per partition: compare the sets, not an order.
    assert sorted((size, sha) for size, sha, *_ in dead) == sorted(
        (len(v), hashlib.sha256(v).hexdigest()) for v in records)
    assert all(truncated and 0 < kept <= KEPT_BYTES for _, _, truncated, kept, _ in dead)
    assert all("byte cap" in reason for *_, reason in dead)
    dlq = KafkaConsumer(settings.kafka.dlq_topic, bootstrap_servers=settings.kafka.bootstrap_servers,
                        auto_offset_reset="earliest", consumer_timeout_ms=5000)
    published = [dict(m.headers) for m in dlq]
    dlq.close()
    assert sorted(int(h["size"]) for h in published) == sorted(len(v) for v in records)
    assert all(p.lag == 0 for p in topic_offsets(settings.kafka, settings.kafka.topic,
                                                 settings.kafka.group_id))


def test_dead_letters_are_listed_and_replayed_after_a_fix(broker: Settings, settings: Settings,
                                                          store: Store) -> None:
    """``tuneloop deadletters list | replay``: a dead letter the contract accepts once its
    cause is fixed (here, an app that keyed records by the wrong id) goes back to the
    feedback topic and lands once, however often it is replayed; one still refused
    (schema version 2) or kept only in part stays, with the reason said."""
    from typer.testing import CliRunner

    from tuneloop.cli.main import app

    ensure_topics(settings.kafka)
    wrong_key, v2 = _events(2, seed=11)
    v2_raw = json.loads(v2.to_json_bytes()) | {"schema_version": 2}
    _send_raw(settings, [(b"not-its-id", wrong_key.to_json_bytes()),
                         (None, json.dumps(v2_raw).encode()), (None, b"x" * 100_000)])

    def ingest() -> None:
        consumer = IngestConsumer(settings, store)
        try:
            consumer.run()
        finally:
            consumer.close()

    ingest()
    env = {"TUNELOOP_KAFKA__TOPIC": settings.kafka.topic,
           "TUNELOOP_KAFKA__DLQ_TOPIC": settings.kafka.dlq_topic,
           "TUNELOOP_KAFKA__GROUP_ID": settings.kafka.group_id, "COLUMNS": "200"}

    def cli(*args: str) -> str:
        result = CliRunner().invoke(app, ["--home", str(settings.home), "deadletters", *args],
                                    env=env)
        assert result.exit_code == 0, result.output
        return result.output

    listing = cli("list")
    assert "does not match event_id" in listing and "schema_version=2" in listing
    assert "(cut)" in listing
    sent = cli("replay", "--reason", "does not match")
    assert "sent back 1" in sent
    ingest()
    assert _feedback_ids(store) == [str(wrong_key.event_id)]

    with store.connect() as con:
        every = [r for (r,) in con.execute("SELECT dead_letter_id FROM dead_letters").fetchall()]
    again = cli("replay", *every)
    assert "replayed at" in again and "still refused: schema_version=2" in again
    assert "only part of its 100000 bytes" in again and "nothing to send" in again
    assert "sent back 1" in cli("replay", "--again", "--reason", "does not match")
    ingest()
    assert _feedback_ids(store) == [str(wrong_key.event_id)]  # once, however often replayed


def test_stored_offsets_a_restarted_broker_no_longer_holds_are_forgotten(
        broker: Settings, settings: Settings, store: Store) -> None:
    """The store remembers offsets of a log the broker lost (the embedded broker keeps it
    in memory): seeking there would skip the new log's first records. Kafka has no
    commit for the group, so the stored offsets are dropped and every record lands."""
    from tuneloop.services.ingest.store import ConsumedOffsets, stored_offsets, write_batch

    ensure_topics(settings.kafka)
    events = _events(300)
    _send_raw(settings, [(str(e.event_id).encode(), e.to_json_bytes()) for e in events])
    ends = {p.partition: p.end for p in topic_offsets(settings.kafka, settings.kafka.topic, None)}
    stale = {(settings.kafka.topic, p): end // 2 for p, end in ends.items()}
    with store.connect() as con:
        write_batch(con, PreparedBatch(), ConsumedOffsets(settings.kafka.group_id, stale))

    consumer = IngestConsumer(settings, store)
    try:
        stats = consumer.run()
    finally:
        consumer.close()
    assert stats.inserted == len(events)
    assert sorted(_feedback_ids(store)) == sorted(str(e.event_id) for e in events)
    with store.connect() as con:
        kept = stored_offsets(con, settings.kafka.group_id, list(stale))
    assert kept == {(settings.kafka.topic, p): end for p, end in ends.items()}
