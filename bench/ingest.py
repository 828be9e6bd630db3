"""Ingest throughput: the full path against a raw kafka-python poll loop, same broker, same events.

Full path: poll, validate (contract v1), redact PII, upsert into DuckDB, commit offsets.
Baseline: a kafka-python consumer in a group that polls the same topic and only
``json.loads`` each value. Both start with their group joined (the join is
excluded from both clocks) and stop when they have seen every event.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer

from infra.broker import EmbeddedBroker
from infra.processes import free_port
from services import banking77
from services.consumer import IngestConsumer
from services.ingest import PreparedBatch
from services.settings import Settings, load_settings
from services.store import Store
from services.topics import ensure_topics


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


def _raw_loop(settings: Settings, n: int) -> float:
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
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    return elapsed


def _full_path(settings: Settings, n: int) -> float:
    consumer = IngestConsumer(settings, Store(settings.db_path))
    first: list[float] = []

    def start_clock(batch: PreparedBatch) -> None:
        if not first:
            first.append(time.perf_counter())

    consumer.run(until_idle=False, stop=lambda stats: stats.seen >= n, on_batch=start_clock)
    elapsed = time.perf_counter() - first[0]
    consumer.close()
    return elapsed


def main(settings: Settings | None = None, quick: bool = False) -> dict[str, float]:
    n = 10_000 if quick else 50_000
    home = Path(tempfile.mkdtemp(prefix="tuneloop-bench-ingest-"))
    port = free_port()
    cfg = load_settings({
        "home": home, "kafka.bootstrap_servers": f"127.0.0.1:{port}",
        "kafka.group_id": "bench-ingest", "ingest.batch_size": 5000,
    })
    broker = EmbeddedBroker(cfg)
    broker.start()
    try:
        ensure_topics(cfg.kafka)
        size = _fill_topic(cfg, n)
        print(f"topic holds {n:,} events ({size / n:.0f} bytes each) on embedded tansu")
        results: dict[str, list[float]] = {}
        # Alternate the order so neither side profits from a warm page cache or JIT-free luck.
        for rnd, order in enumerate((("raw", "full"), ("full", "raw"), ("raw", "full"))):
            for side in order:
                run_cfg = cfg.model_copy(update={
                    "kafka": cfg.kafka.model_copy(update={"group_id": f"bench-{side}-{rnd}"}),
                    "store": cfg.store.model_copy(update={"path": home / f"{side}-{rnd}.duckdb"}),
                })
                seconds = _raw_loop(run_cfg, n) if side == "raw" else _full_path(run_cfg, n)
                results.setdefault(side, []).append(n / seconds)
                print(f"round {rnd + 1} {side:>4}: {n / seconds:>9,.0f} events/s")
        with Store(home / "full-0.duckdb").connect() as con:
            landed = con.execute("SELECT count(*) FROM feedback").fetchall()[0][0]
        assert landed == n, f"full path landed {landed} of {n}"
    finally:
        broker.stop()
    raw_eps = max(results["raw"])
    full_eps = max(results["full"])
    ratio = full_eps / raw_eps
    print(f"machine: {machine()}")
    print(f"raw kafka-python poll+json.loads: {raw_eps:,.0f} events/s (best of 3)")
    print(f"tuneloop ingest (validate, redact, DuckDB upsert, commit): {full_eps:,.0f} events/s (best of 3)")
    print(f"FIGURE ingest_ratio={ratio:.3f}")
    print(f"FIGURE ingest_events_per_s={full_eps:.0f}")
    return {"ingest_ratio": ratio, "ingest_events_per_s": full_eps}


if __name__ == "__main__":
    main()
