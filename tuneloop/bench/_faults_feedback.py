"""Faults on the feedback path: ingest killed mid-batch, hostile events, a broker outage.

Each returns the ``Outcome`` it cost: events sent, stored, dead-lettered, duplicated, and
whether ingest caught up by itself.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from typing import Any

from tuneloop.bench._faults_stack import Bench, Outcome, fault_events
from tuneloop.infra.supervisor import read_state
from tuneloop.runtime.processes import wait_until


def ingest_kill(b: Bench, n: int) -> Outcome:
    """SIGKILL the ingest consumer while it works through ``n`` events."""
    out = Outcome("ingest SIGKILL mid-batch")
    events = fault_events(n, seed=11)
    ids = {str(e.event_id) for e in events}
    dead_before = b.dead_letters()
    restarts = b.ingest_restarts()
    stored_before = b.stored()
    # The app keeps sending while ingest works; the kill comes once a tenth is stored.
    sender = threading.Thread(target=b.send_raw, args=([e.to_json_bytes() for e in events],))
    sender.start()
    out.sent = n
    wait_until(lambda: b.stored() - stored_before >= n // 10, 300, "ingest progress",
               interval_s=0.02)
    child = (read_state(b.home, "ingest") or {}).get("child_pid")
    if child:
        os.kill(int(child), signal.SIGKILL)
    landed = b.stored() - stored_before
    sender.join()
    wait_until(lambda: b.ingest_restarts() > restarts, 60, "ingest restart")
    out.recovered = b.caught_up(300)
    b.count(out, ids, dead_before)
    out.detail = (f"killed pid {child} with {landed:,} of {n:,} stored, the app still sending; "
                  f"its supervisor restarted it "
                  f"({b.ingest_restarts() - restarts} restart)")
    return out


def hostile_payloads(n: int, max_bytes: int) -> list[bytes]:
    """``n`` payloads from hypothesis strategies (a fixed seed: the same run each time)."""
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    template = json.loads(fault_events(1, seed=5)[0].to_json_bytes())
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
        | st.text(max_size=200),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner,
                                                                   max_size=5),
        max_leaves=20)
    nasty_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=300)

    def with_id(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "event_id": str(uuid.uuid4())}

    def replaced(key: str, value: Any) -> bytes:
        return json.dumps({**with_id(template), key: value}).encode()

    def nasty_user_turn(text: str) -> bytes:
        # ensure_ascii writes lone surrogates as \\udXXX escapes: valid JSON, not UTF-8 text.
        return json.dumps({**with_id(template),
                           "messages": [{"role": "user", "content": text}]}).encode()

    def oversized(size: int) -> bytes:
        return json.dumps({**with_id(template), "metadata": {"blob": "x" * size}}).encode()

    payload = st.one_of(
        st.binary(max_size=2000),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.builds(replaced, st.sampled_from(sorted(template)), json_values),
        nasty_text.map(nasty_user_turn),
        st.integers(max_bytes, 2 * max_bytes).map(oversized),
    )
    out: list[bytes] = []

    @seed(20261123)
    @settings(max_examples=n, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(payload)
    def collect(value: bytes) -> None:
        out.append(value)

    collect()
    return out[-n:]


def hostile_events(b: Bench, n: int) -> Outcome:
    """Send ``n`` hostile payloads: each must be stored or dead-lettered with a reason,
    and the consumer must not crash."""
    out = Outcome("hostile events (hypothesis)")
    payloads = hostile_payloads(n, b.settings.ingest.max_event_bytes)
    before = set(b.feedback_ids())
    dead_before = b.dead_letters()
    restarts = b.ingest_restarts()
    b.send_raw(payloads)
    out.sent = len(payloads)
    out.recovered = b.caught_up(300)
    after = b.feedback_ids()
    new = [i for i in after if i not in before]
    out.stored, out.duplicated = len(set(new)), len(new) - len(set(new))
    out.dead_lettered = b.dead_letters() - dead_before
    crashed = b.ingest_restarts() - restarts
    if crashed:
        out.recovered = False
    from tuneloop.services.ingest.dead_letters import recent_reasons

    with b.store.connect() as con:
        reasons = recent_reasons(con, out.dead_lettered)
    kinds = Counter(" ".join(r.split()[:4])[:60] for r in reasons)
    out.detail = (f"{out.stored} were valid events, {out.dead_lettered} dead-lettered; ingest "
                  f"crashed {crashed} times; most common reasons: "
                  + "; ".join(f"{k!r} x{v}" for k, v in kinds.most_common(5)))
    return out


def broker_outage(b: Bench, n: int, outage_s: float) -> Outcome:
    """An app sends ``n`` events through the producer SDK at a steady rate while the
    broker is stopped for ``outage_s`` and started again."""
    from tuneloop.services.feedback.producer import FeedbackProducer
    from tuneloop.services.feedback.topics import ensure_topics

    out = Outcome("broker outage while producers send")
    events = fault_events(n, seed=13)
    ids = {str(e.event_id) for e in events}
    dead_before = b.dead_letters()
    sent_during = 0
    with FeedbackProducer(b.settings, background=True) as producer:
        third = n // 3
        producer.send_many(events[:third])
        producer.flush(30)
        time.sleep(2)
        b.stack.broker.stop()
        stopped = time.monotonic()
        for event in events[third:2 * third]:  # accepted into the outbox meanwhile
            producer.send(event)
            sent_during += 1
        time.sleep(max(0.0, outage_s - (time.monotonic() - stopped)))
        b.stack.broker.start()
        ensure_topics(b.settings.kafka, extra=(b.settings.serving.shadow_topic,))
        producer.send_many(events[2 * third:])
        report = producer.flush(120)
    out.sent = n
    out.recovered = report.complete and b.caught_up(300)
    b.count(out, ids, dead_before)
    out.detail = (f"{sent_during} events accepted while the broker was down for {outage_s:.0f} s; "
                  f"outbox {'empty' if report.complete else f'{report.pending} still pending'} "
                  "afterwards")
    return out


def oversized_records(b: Bench) -> Outcome:
    """Binary and Latin-1 records of 0.5, 1 and 5 MB sent raw, then valid events behind
    them: each big record must become a dead letter (cut to what a dead letter carries,
    with its size and checksum), the events behind it must land, and ingest must not
    crash on any of them."""
    import random

    from kafka import KafkaProducer

    out = Outcome("oversized binary and Latin-1 records")
    rng = random.Random(3)
    records = []
    for mb in (0.5, 1, 5):
        n = int(mb * 1024 * 1024)
        records.append(rng.randbytes(n))
        records.append(("Grüße aus Köln, café crème: " * (n // 28 + 1)).encode("latin-1")[:n])
    events = fault_events(20, seed=19)
    ids = {str(e.event_id) for e in events}
    dead_before = b.dead_letters()
    restarts = b.ingest_restarts()
    producer = KafkaProducer(bootstrap_servers=b.settings.kafka.bootstrap_servers, acks="all",
                             max_request_size=8 * 1024 * 1024)
    for value in [*records, *(e.to_json_bytes() for e in events)]:
        producer.send(b.settings.kafka.topic, value=value)
    producer.flush()
    producer.close()
    out.sent = len(records) + len(events)
    out.recovered = b.caught_up(300) and b.ingest_restarts() == restarts
    b.count(out, ids, dead_before)
    out.detail = (f"{len(records)} records of 0.5 to 5 MB and {len(events)} valid events "
                  f"behind them: {out.dead_lettered} dead letters, {out.stored} events stored; "
                  f"ingest restarted {b.ingest_restarts() - restarts} times")
    return out


def stale_pid_file(b: Bench, n: int) -> Outcome:
    """Ingest's pid file left naming a pid that another, unrelated process now has (a pid
    reused after a reboot): stopping ingest must not signal that process, `up` must start
    ingest again, and events sent afterwards must land."""
    import subprocess
    import sys

    from tuneloop.runtime.processes import ManagedProcess

    out = Outcome("stale pid file naming an unrelated process")
    ingest = ManagedProcess("ingest", b.home)
    record = json.loads(ingest.pid_file.read_text())
    ingest.stop()
    # The unrelated process: same executable as ingest, another start time.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             start_new_session=True)
    try:
        stale = json.dumps({**record, "pid": other.pid})
        ingest.pid_file.write_text(stale)
        stopped = ingest.stop(timeout_s=2)  # `down` with the stale file
        ingest.pid_file.write_text(stale)
        b.stack.up(worker=False, serving=False)  # `up` with it
        started = ingest.pid()
        events = fault_events(n, seed=23)
        ids = {str(e.event_id) for e in events}
        dead_before = b.dead_letters()
        b.send_raw([e.to_json_bytes() for e in events])
        out.sent = n
        caught_up = b.caught_up(300)
        b.count(out, ids, dead_before)
        unharmed = other.poll() is None
    finally:
        other.kill()
        other.wait()
    out.recovered = bool(caught_up and unharmed and not stopped and started
                         and started != other.pid)
    out.detail = (f"ingest's pid file named pid {other.pid} (another process, alive); stop "
                  f"{'signalled it' if stopped else 'left it alone'}; up started ingest as pid "
                  f"{started}; the other process {'alive' if unharmed else 'KILLED'}; "
                  f"{out.stored} of {n} events sent afterwards stored")
    return out
