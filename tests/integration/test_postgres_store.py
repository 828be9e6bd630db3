"""The operational store in Postgres, with the real broker: several ingest workers
writing at once, exactly once, through a kill; offsets stored with the rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from tests.integration.test_ingest import _mixed_traffic
from tuneloop.infra.postgres import LocalPostgres
from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.feedback.topics import ensure_topics, topic_offsets
from tuneloop.services.ingest.consumer import IngestConsumer
from tuneloop.services.store.database import Store
from tuneloop.services.store.postgres import PostgresStore

pytestmark = pytest.mark.integration

# Writes every batch's partitions to a file, so the test sees both workers at work.
WORKER = """
import sys
from pathlib import Path
from tuneloop.runtime.settings import load_settings
from tuneloop.services.ingest.consumer import IngestConsumer

log = Path(sys.argv[1])
c = IngestConsumer(load_settings())
def note(batch):
    parts = sorted(tp.partition for tp in c.consumer.assignment())
    with log.open("a") as f:
        f.write(",".join(map(str, parts)) + "\\n")
c.run(on_batch=note)
c.close()
"""


def _pg_settings(settings: Settings, postgres_server: LocalPostgres) -> Settings:
    url = postgres_server.new_database(f"t_{uuid.uuid4().hex[:12]}")
    return load_settings({"home": settings.home, "kafka.topic": settings.kafka.topic,
                          "kafka.dlq_topic": settings.kafka.dlq_topic,
                          "kafka.group_id": settings.kafka.group_id, "kafka.partitions": 4,
                          "store.url": url, "ingest.batch_size": 200})


def _worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    assert settings.store.url is not None
    env = {**os.environ, "TUNELOOP_HOME": str(settings.home),
           "TUNELOOP_KAFKA__TOPIC": settings.kafka.topic,
           "TUNELOOP_KAFKA__DLQ_TOPIC": settings.kafka.dlq_topic,
           "TUNELOOP_KAFKA__GROUP_ID": settings.kafka.group_id,
           "TUNELOOP_INGEST__BATCH_SIZE": str(settings.ingest.batch_size),
           "TUNELOOP_STORE__URL": settings.store.url.get_secret_value()}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(log)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stored(store: PostgresStore, group: str) -> dict[int, int]:
    with store.connect() as con:
        return {int(p): int(o) for p, o in con.execute(
            "SELECT partition_id, next_offset FROM ingest_offsets WHERE consumer_group = ?",
            [group]).fetchall()}


def test_two_ingest_workers_write_at_once_and_a_killed_one_loses_and_doubles_nothing(
        broker: Settings, settings: Settings, postgres_server: LocalPostgres,
        tmp_path: Path) -> None:
    pg = _pg_settings(settings, postgres_server)
    ensure_topics(pg.kafka)
    valid_ids, n_bad = _mixed_traffic(pg, 8000)
    store = Store.of(pg)
    assert isinstance(store, PostgresStore)

    ends = {p.partition: p.end for p in topic_offsets(pg.kafka, pg.kafka.topic, None)}
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [_worker(pg, log) for log in logs]
    # Both hold partitions and write (the group split the 4 partitions), then one dies
    # mid-stream, with a batch in flight and records of its partitions unread.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        seen = [log.read_text().split() if log.exists() else [] for log in logs]
        if all(len(s) >= 3 for s in seen) and seen[0][-1] != seen[1][-1]:
            # Stopped while its partitions are looked at, so it cannot finish them between
            # the look and the kill.
            workers[0].send_signal(signal.SIGSTOP)
            stored = _stored(store, pg.kafka.group_id)
            if any(stored.get(int(p), 0) < ends[int(p)] for p in seen[0][-1].split(",")):
                break
            workers[0].send_signal(signal.SIGCONT)
        assert all(w.poll() is None for w in workers), [
            w.stderr.read().decode()[-2000:] for w in workers if w.poll() is not None and w.stderr]
        time.sleep(0.05)
    else:
        pytest.fail(f"the two workers did not both write: {seen}")
    split = [set(s[-1].split(",")) for s in seen]
    assert split[0] and split[1] and not split[0] & split[1]
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait()
    assert sum(_stored(store, pg.kafka.group_id).values()) < sum(ends.values())

    # The survivor does not leave while the dead one's partitions hold unread records:
    # it takes them over once that member's session expires, and finishes them.
    assert workers[1].wait(timeout=240) == 0, workers[1].stderr.read().decode()[-3000:]
    assert _stored(store, pg.kafka.group_id) == ends
    assert set(logs[1].read_text().split()[-1].split(",")) == {"0", "1", "2", "3"}

    with store.connect() as con:
        ids = [r[0] for r in con.execute("SELECT event_id FROM feedback").fetchall()]
        seqs = [r[0] for r in con.execute("SELECT seq FROM feedback").fetchall()]
        dead = con.execute("SELECT count(*), count(DISTINCT dead_letter_id) FROM dead_letters"
                           ).fetchone()
    assert len(ids) == len(set(ids)) == len(valid_ids) and set(ids) == valid_ids
    assert dead == (n_bad, n_bad)
    assert None not in seqs and len(set(seqs)) == len(seqs)
    # Where the group goes on is stored with the rows: the end of every partition.
    assert _stored(store, pg.kafka.group_id) == ends


def test_a_member_resumes_from_the_offsets_stored_with_the_rows_not_kafkas(
        broker: Settings, settings: Settings, postgres_server: LocalPostgres) -> None:
    """Kafka's committed offsets are lost (reset to the start); the store's are not, so
    a new member reads nothing twice and lands nothing twice."""
    pg = _pg_settings(settings, postgres_server)
    ensure_topics(pg.kafka)
    valid_ids, _ = _mixed_traffic(pg, 1000)
    first = IngestConsumer(pg)
    try:
        stats = first.run()
    finally:
        first.close()
    assert stats.inserted == len(valid_ids)

    rewind = Consumer({"bootstrap.servers": pg.kafka.bootstrap_servers,
                       "group.id": pg.kafka.group_id, "enable.auto.commit": False})
    try:
        rewind.commit(offsets=[TopicPartition(pg.kafka.topic, p, 0)
                               for p in range(pg.kafka.partitions)], asynchronous=False)
    finally:
        rewind.close()
    assert all(p.committed == 0 for p in topic_offsets(pg.kafka, pg.kafka.topic,
                                                         pg.kafka.group_id))

    again = IngestConsumer(pg)
    try:
        replay = again.run()
    finally:
        again.close()
    assert replay.polled == 0 and replay.inserted == 0
    assert Store.of(pg).counts()["feedback"] == len(valid_ids)
