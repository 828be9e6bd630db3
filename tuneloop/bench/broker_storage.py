"""Where the embedded broker keeps its log: tansu on memory (the baseline) against tansu
on its S3 engine over the embedded object store (SeaweedFS), same machine, same records.

Per side and round, on a topic of its own (3 partitions):
- broker start: the process started until it answers a Kafka ApiVersions request; on S3
  also a restart with the round's records in the store (memory has none to read back);
- produce: N records of about 200 bytes, sent as tuneloop's producer sends them
  (kafka-python, acks=all, idempotent, one request in flight, linger 5 ms), clock to the
  last acknowledgement;
- consume: the records read back as ingest reads them (librdkafka, offsets committed
  for the group after each batch of 1,000), the partitions assigned rather than joined
  (a join takes seconds on tansu), clock from the assignment to the last commit.
Three rounds, the order of the sides rotated; the figure is each side's best round
(medians shown too). The CPU time the broker and the store spent in each phase, and
the load average, are printed beside them. ``FIGURE`` lines give S3 against memory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from kafka import KafkaProducer

from tuneloop.bench.ingest import machine
from tuneloop.infra.broker import EmbeddedBroker
from tuneloop.infra.object_store import EmbeddedObjectStore
from tuneloop.runtime.processes import free_port, port_open, wait_until
from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.feedback.topics import ensure_topics

SIDES = ("memory", "s3")


def _settings(home: Path, storage: str, endpoint: str, topic: str) -> Settings:
    return load_settings({
        "home": home, "kafka.bootstrap_servers": f"127.0.0.1:{free_port()}",
        "kafka.storage_engine": storage, "kafka.topic": topic,
        "kafka.dlq_topic": f"{topic}.dlq", "kafka.group_id": f"bench-{topic}",
        "object_store.endpoint": endpoint,
    })


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _timed(pids: list[int], step: Callable[[], float]) -> tuple[float, float]:
    """``step``'s own seconds, and the CPU seconds ``pids`` spent meanwhile."""
    before = _cpu_s(pids)
    seconds = step()
    return seconds, _cpu_s(pids) - before


def _start(broker: EmbeddedBroker) -> float:
    started = time.perf_counter()
    broker.start()
    return time.perf_counter() - started


def _kill(broker: EmbeddedBroker) -> None:
    broker.process.stop(sig=signal.SIGKILL)
    wait_until(lambda: not port_open(broker.host, broker.port), 10.0, "the broker's port")


def _produce(settings: Settings, n: int) -> float:
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all",
                             enable_idempotence=True, max_in_flight_requests_per_connection=1,
                             linger_ms=5)
    pad = "x" * 150
    values = [json.dumps({"i": i, "event_id": str(uuid.uuid4()), "pad": pad}).encode()
              for i in range(n)]
    started = time.perf_counter()
    futures = [producer.send(settings.kafka.topic, key=str(i).encode(), value=v)
               for i, v in enumerate(values)]
    producer.flush(timeout=600)
    for future in futures:
        future.get(timeout=60)
    elapsed = time.perf_counter() - started
    producer.close()
    return elapsed


def _consume(settings: Settings, n: int) -> float:
    cfg = settings.kafka
    consumer = Consumer({"bootstrap.servers": cfg.bootstrap_servers, "group.id": cfg.group_id,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    # Assigned, not subscribed: no group join (seconds on tansu) inside the clock, which
    # runs from the assignment to the last commit.
    started = time.perf_counter()
    consumer.assign([TopicPartition(cfg.topic, p, OFFSET_BEGINNING)
                     for p in range(cfg.partitions)])
    seen = 0
    deadline = time.monotonic() + 600
    while seen < n and time.monotonic() < deadline:
        messages = consumer.consume(num_messages=1000, timeout=1.0)
        seen += sum(1 for m in messages if m.error() is None)
        if messages:
            consumer.commit(asynchronous=False)
    elapsed = time.perf_counter() - started
    consumer.close()
    if seen < n:
        raise RuntimeError(f"read {seen} of {n} records back from {cfg.topic}")
    return elapsed


def _round(settings: Settings, store: EmbeddedObjectStore | None, n: int) -> dict[str, float]:
    """One side's round on its own broker: start, produce, consume (and a restart on S3)."""
    broker = EmbeddedBroker(settings)
    figures: dict[str, float] = {"start_s": _start(broker)}
    pids = [p for p in (broker.process.pid(), store.process.pid() if store else None)
            if p is not None]
    try:
        ensure_topics(settings.kafka)
        seconds, cpu = _timed(pids, lambda: _produce(settings, n))
        figures.update(produce_per_s=n / seconds, produce_cpu_s=cpu)
        seconds, cpu = _timed(pids, lambda: _consume(settings, n))
        figures.update(consume_per_s=n / seconds, consume_cpu_s=cpu)
        if store is not None:
            _kill(broker)
            figures["restart_s"] = _start(broker)
    finally:
        broker.stop()
    return figures


def main(settings: Settings | None = None, quick: bool = False) -> dict[str, float]:
    n = 5_000 if quick else 20_000
    home = Path(tempfile.mkdtemp(prefix="tuneloop-bench-storage-"))
    endpoint = f"http://127.0.0.1:{free_port()}"
    load_before = os.getloadavg()
    store = EmbeddedObjectStore(_settings(home, "s3://tuneloop/", endpoint, "warmup"))
    started = time.perf_counter()
    store.start()
    store_cold_s = time.perf_counter() - started
    results: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    try:
        orders = (SIDES, SIDES[::-1], SIDES)
        for rnd, order in enumerate(orders):
            for side in order:
                topic = f"bench.storage.{side}.{rnd}"
                storage = "memory" if side == "memory" else "s3://tuneloop/"
                figures = _round(_settings(home, storage, endpoint, topic),
                                 store if side == "s3" else None, n)
                results[side].append(figures)
                print(f"round {rnd + 1} {side:>6}: start {figures['start_s']:.2f} s, produce "
                      f"{figures['produce_per_s']:,.0f}/s, consume {figures['consume_per_s']:,.0f}/s"
                      + (f", restart with the log {figures['restart_s']:.2f} s"
                         if "restart_s" in figures else ""))
        store.stop()
        started = time.perf_counter()
        store.start()
        store_warm_s = time.perf_counter() - started
    finally:
        store.stop()
        shutil.rmtree(home, ignore_errors=True)
    load_after = os.getloadavg()
    return _report(results, n, store_cold_s, store_warm_s, load_before, load_after)


def _report(results: dict[str, list[dict[str, float]]], n: int, store_cold_s: float,
            store_warm_s: float, load_before: tuple[float, float, float],
            load_after: tuple[float, float, float]) -> dict[str, float]:
    def best(side: str, key: str) -> float:
        values = [r[key] for r in results[side]]
        return min(values) if key in ("start_s", "restart_s") else max(values)

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side])

    print(f"machine: {machine()}; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after")
    print(f"{n:,} records of about 200 bytes a round; best of 3 (median):")
    for side in SIDES:
        label = "memory" if side == "memory" else "S3 (embedded SeaweedFS)"
        print(f"  {label}: broker start {best(side, 'start_s'):.2f} s "
              f"({median(side, 'start_s'):.2f}); produce {best(side, 'produce_per_s'):,.0f}/s "
              f"({median(side, 'produce_per_s'):,.0f}), broker+store CPU "
              f"{median(side, 'produce_cpu_s'):.2f} s; consume {best(side, 'consume_per_s'):,.0f}/s "
              f"({median(side, 'consume_per_s'):,.0f}), CPU {median(side, 'consume_cpu_s'):.2f} s")
    print(f"  S3: broker restart with its log in the store {best('s3', 'restart_s'):.2f} s "
          f"({median('s3', 'restart_s'):.2f}); object store start {store_cold_s:.2f} s empty, "
          f"{store_warm_s:.2f} s with {3 * n:,} records in it")
    figures: dict[str, Any] = {
        "broker_storage_produce_ratio": best("s3", "produce_per_s") / best("memory", "produce_per_s"),
        "broker_storage_consume_ratio": best("s3", "consume_per_s") / best("memory", "consume_per_s"),
        "broker_storage_start_s_memory": best("memory", "start_s"),
        "broker_storage_start_s_s3": best("s3", "start_s"),
        "broker_storage_store_start_s": store_cold_s,
    }
    for name, value in figures.items():
        print(f"FIGURE {name}={value:.3f}")
    return {k: float(v) for k, v in figures.items()}


if __name__ == "__main__":
    main()
