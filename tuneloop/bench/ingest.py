"""Ingest throughput: the full path against raw consume loops, same broker, same events.

- Full path (tuneloop's ``IngestConsumer``, librdkafka): poll, validate (contract v1),
  redact PII, upsert into DuckDB, dead letters, commit each batch's offsets once written.
- Raw librdkafka loop (confluent-kafka, the fastest Python client, the one ingest uses):
  ``consume`` batches, ``json.loads`` each value, commit asynchronously after each batch
  and synchronously at the end.
- Raw kafka-python loop: the same with kafka-python, a second row.

Every clock runs from the first record polled to the last offset committed; the group
join is outside all of them. Three rounds, the order rotated; the figure is the best
round of each side (their medians are shown too). ``FIGURE ingest_ratio`` is the full
path against the librdkafka loop. A breakdown times each stage of the full path on
the same records, one at a time, in microseconds per event.

``--store postgres`` runs the same comparison into Postgres, one and two workers
(:mod:`tuneloop.bench._ingest_pg`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer
from kafka import KafkaConsumer, KafkaProducer

from tuneloop.infra.broker import EmbeddedBroker
from tuneloop.runtime.processes import free_port
from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.demo import banking77
from tuneloop.services.feedback.topics import ensure_topics
from tuneloop.services.ingest.consumer import IngestConsumer
from tuneloop.services.ingest.core import RawRecord, prepare_batch
from tuneloop.services.ingest.store import write_isolating
from tuneloop.services.store.database import Store


def machine() -> str:
    """CPU model, cores and memory, for the results table."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, python {platform.python_version()}"


def _fill_topic(settings: Settings, n: int) -> int:
    queries = banking77.load("train")
    events = banking77.to_events([queries[i % len(queries)] for i in range(n)], seed=42)
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all",
                             linger_ms=20, batch_size=256 * 1024)
    size = 0
    for event in events:
        raw = event.to_json_bytes()
        size += len(raw)
        producer.send(settings.kafka.topic, key=str(event.event_id).encode(), value=raw)
    producer.flush()
    producer.close()
    return size


def _librdkafka_config(settings: Settings) -> dict[str, Any]:
    cfg = settings.kafka
    return {"bootstrap.servers": cfg.bootstrap_servers, "group.id": cfg.group_id,
            "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "session.timeout.ms": cfg.session_timeout_ms,
            "heartbeat.interval.ms": cfg.heartbeat_interval_ms}


def _librdkafka_loop(settings: Settings, n: int) -> float:
    consumer = Consumer(_librdkafka_config(settings))
    consumer.subscribe([settings.kafka.topic])
    seen, started = 0, None
    while seen < n:
        messages = consumer.consume(num_messages=settings.ingest.batch_size, timeout=1.0)
        if messages and started is None:
            started = time.perf_counter()
        for m in messages:
            if m.error() is None:
                json.loads(m.value())  # type: ignore[arg-type]
                seen += 1
        if messages:
            consumer.commit(asynchronous=True)
    consumer.commit(asynchronous=False)
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    return elapsed


def _kafka_python_loop(settings: Settings, n: int) -> float:
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers, group_id=f"raw-{uuid.uuid4().hex[:6]}",
        enable_auto_commit=False, auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka.session_timeout_ms,
        heartbeat_interval_ms=settings.kafka.heartbeat_interval_ms,
        max_poll_records=settings.ingest.batch_size,
        fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    consumer.subscribe([settings.kafka.topic])
    seen, started = 0, None
    while seen < n:
        records = consumer.poll(timeout_ms=1000, max_records=settings.ingest.batch_size)
        for batch in records.values():
            if started is None:
                started = time.perf_counter()
            for record in batch:
                json.loads(record.value)
                seen += 1
        if records:
            consumer.commit_async()
    consumer.commit()
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    return elapsed


class _Clocked:
    """The ingest consumer's librdkafka handle, noting the first record polled and the
    end of the last commit."""

    def __init__(self, inner: Consumer) -> None:
        self.inner = inner
        self.first: float | None = None
        self.last_commit = 0.0

    def consume(self, *args: Any, **kwargs: Any) -> Any:
        messages = self.inner.consume(*args, **kwargs)
        if messages and self.first is None:
            self.first = time.perf_counter()
        return messages

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner.commit(*args, **kwargs)
        self.last_commit = time.perf_counter()
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _full_path(settings: Settings, n: int) -> float:
    """The full path into the store ``settings`` name, until ``n`` records are written."""
    consumer = IngestConsumer(settings)
    clocked = _Clocked(consumer.consumer)
    consumer.consumer = clocked  # type: ignore[assignment]
    consumer.run(until_idle=False, stop=lambda stats: stats.seen >= n)
    consumer.close()
    assert clocked.first is not None
    return clocked.last_commit - clocked.first


def breakdown(settings: Settings, n: int, home: Path) -> dict[str, float]:
    """Microseconds per event of each stage, one at a time on the same records."""
    consumer = Consumer(_librdkafka_config(settings) | {"group.id": "bench-breakdown"})
    consumer.subscribe([settings.kafka.topic])
    raw: list[RawRecord] = []
    polled = 0.0
    while len(raw) < n:
        t0 = time.perf_counter()
        messages = consumer.consume(num_messages=settings.ingest.batch_size, timeout=1.0)
        if raw or messages:
            polled += time.perf_counter() - t0
        raw += [RawRecord(m.topic() or "", m.partition() or 0, m.offset() or 0, m.key(),
                          m.value() or b"") for m in messages if m.error() is None]
    consumer.close()
    size = settings.ingest.batch_size
    t0 = time.perf_counter()
    for r in raw:
        json.loads(r.value)
    decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = [prepare_batch(raw[i:i + size], settings.ingest.max_event_bytes)
               for i in range(0, len(raw), size)]
    prepare = time.perf_counter() - t0
    with Store(home / "breakdown.duckdb").connect() as con:
        t0 = time.perf_counter()
        for batch in batches:
            write_isolating(con, batch, False)
        write = time.perf_counter() - t0
    per = 1e6 / len(raw)
    return {"poll (librdkafka consume)": polled * per, "json.loads alone": decode * per,
            "prepare: decode, validate, redact": prepare * per,
            "DuckDB upsert (one thread)": write * per}


def main(settings: Settings | None = None, quick: bool = False,
         store: str = "duckdb") -> dict[str, float]:
    if store == "postgres":
        from tuneloop.bench._ingest_pg import main as on_postgres

        return on_postgres(settings, quick)
    n = 10_000 if quick else 50_000
    home = Path(tempfile.mkdtemp(prefix="tuneloop-bench-ingest-"))
    port = free_port()
    cfg = load_settings({
        "home": home, "kafka.bootstrap_servers": f"127.0.0.1:{port}",
        "kafka.group_id": "bench-ingest", "ingest.batch_size": 5000,
        # Every side reads the same broker, its log in memory: the broker's storage is
        # bench broker_storage's subject, not this one's.
        "kafka.storage_engine": "memory",
    })
    broker = EmbeddedBroker(cfg)
    broker.start()
    loops = {"librdkafka": _librdkafka_loop, "kafka-python": _kafka_python_loop,
             "full": _full_path}
    try:
        ensure_topics(cfg.kafka)
        size = _fill_topic(cfg, n)
        print(f"topic holds {n:,} events ({size / n:.0f} bytes each) on embedded tansu")
        results: dict[str, list[float]] = {}
        orders = (("librdkafka", "kafka-python", "full"), ("full", "librdkafka", "kafka-python"),
                  ("kafka-python", "full", "librdkafka"))
        for rnd, order in enumerate(orders):
            for side in order:
                run_cfg = cfg.model_copy(update={
                    "kafka": cfg.kafka.model_copy(update={"group_id": f"bench-{side}-{rnd}"}),
                    "store": cfg.store.model_copy(update={"path": home / f"{side}-{rnd}.duckdb"}),
                })
                seconds = loops[side](run_cfg, n)
                results.setdefault(side, []).append(n / seconds)
                print(f"round {rnd + 1} {side:>12}: {n / seconds:>9,.0f} events/s")
        landed = Store(home / "full-0.duckdb").counts()["feedback"]
        assert landed == n, f"full path landed {landed} of {n}"
        stages = breakdown(cfg, n, home)
    finally:
        broker.stop()
    best = {side: max(v) for side, v in results.items()}
    ratio = best["full"] / best["librdkafka"]
    print(f"machine: {machine()}")
    print("events/s, best of 3 (median):")
    for side, label in (("librdkafka", "raw librdkafka consume + json.loads + commit"),
                        ("kafka-python", "raw kafka-python poll + json.loads + commit"),
                        ("full", "tuneloop ingest (validate, redact, DuckDB upsert, commit)")):
        print(f"  {label}: {best[side]:,.0f} ({statistics.median(results[side]):,.0f})")
    print("where the time goes, microseconds per event, each stage alone:")
    for stage, micros in stages.items():
        print(f"  {stage}: {micros:.1f}")
    print(f"  the full path's clock: {1e6 / best['full']:.1f}; the librdkafka loop's: "
          f"{1e6 / best['librdkafka']:.1f}")
    print(f"FIGURE ingest_ratio={ratio:.3f}")
    print(f"FIGURE ingest_kafka_python_ratio={best['full'] / best['kafka-python']:.3f}")
    print(f"FIGURE ingest_events_per_s={best['full']:.0f}")
    return {"ingest_ratio": ratio, "ingest_events_per_s": best["full"]}


if __name__ == "__main__":
    main()
