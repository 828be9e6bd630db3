"""``tuneloop bench ingest --store postgres``: the full ingest path into Postgres, one and
two workers, against the raw librdkafka loop of ``bench ingest``, same broker, same events.

- Raw librdkafka loop (the baseline): ``consume`` batches, ``json.loads`` each value,
  commit after each batch.
- One worker: tuneloop's ``IngestConsumer`` with ``store.url`` on a Postgres server on
  loopback (this machine's PostgreSQL): validate, redact, keyed ``COPY`` into Postgres
  with the batch's offsets in the same transaction, dead letters, commit.
- Two workers: the same, two processes in one consumer group on the topic's four
  partitions, each writing to the same database at once. Their clock runs from the
  first record either polled to the last commit either made.

Every clock starts at the first record polled and stops at the last offset committed;
for two workers that includes the group settling on both (they start together, and a
member that joins late takes partitions from the other). Two rounds, the order
reversed in the second; the figure is each side's best round. Each run has its own
consumer group and database.
``FIGURE ingest_pg_ratio`` is one worker against the raw loop;
``FIGURE ingest_pg_two_workers_speedup`` is two workers against one.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import SecretStr

from tuneloop.bench.ingest import _Clocked, _fill_topic, _full_path, _librdkafka_loop, machine
from tuneloop.infra.broker import EmbeddedBroker
from tuneloop.infra.postgres import LocalPostgres
from tuneloop.runtime.processes import free_port
from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.feedback.topics import ensure_topics
from tuneloop.services.ingest.consumer import IngestConsumer
from tuneloop.services.store.database import Store

PARTITIONS = 4

# One worker process: ingest until the group has every record, then print its clock.
_WORKER = """
import json, sys, time
from tuneloop.bench._ingest_pg import clocked_run
from tuneloop.runtime.settings import load_settings
first, last, polled = clocked_run(load_settings(), int(sys.argv[1]))
print(json.dumps({"first": first, "last": last, "polled": polled}))
"""


def clocked_run(settings: Settings, idle_polls: int) -> tuple[float, float, int]:
    """Ingest until idle; returns (first record polled, last commit) as wall-clock
    seconds, and the records this member polled."""
    consumer = IngestConsumer(settings)
    clocked = _Clocked(consumer.consumer)
    consumer.consumer = clocked  # type: ignore[assignment]
    wall = time.time() - time.perf_counter()  # perf_counter -> epoch, for two processes
    stats = consumer.run(until_idle=True)
    consumer.close()
    first = (clocked.first or time.perf_counter()) + wall
    return first, clocked.last_commit + wall, stats.polled


def _settings(cfg: Settings, group: str, url: str) -> Settings:
    return cfg.model_copy(update={
        "kafka": cfg.kafka.model_copy(update={"group_id": group}),
        "store": cfg.store.model_copy(update={"url": SecretStr(url)}),
    })


def _two_workers(cfg: Settings, n: int) -> float:
    assert cfg.store.url is not None
    env = {**os.environ, "TUNELOOP_HOME": str(cfg.home),
           "TUNELOOP_KAFKA__BOOTSTRAP_SERVERS": cfg.kafka.bootstrap_servers,
           "TUNELOOP_KAFKA__TOPIC": cfg.kafka.topic,
           "TUNELOOP_KAFKA__GROUP_ID": cfg.kafka.group_id,
           "TUNELOOP_INGEST__BATCH_SIZE": str(cfg.ingest.batch_size),
           "TUNELOOP_INGEST__IDLE_POLLS_BEFORE_EXIT": "3",
           "TUNELOOP_STORE__URL": cfg.store.url.get_secret_value()}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, "3"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    clocks = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"an ingest worker failed: {err[-2000:]}")
        clocks.append(json.loads(out.strip().splitlines()[-1]))
    polled = sum(c["polled"] for c in clocks)
    if polled < n:
        raise RuntimeError(f"the two workers polled {polled} of {n} records")
    shares = ", ".join(f"{c['polled']:,}" for c in clocks)
    print(f"    records per worker: {shares}")
    return max(c["last"] for c in clocks) - min(c["first"] for c in clocks)


def main(settings: Settings | None = None, quick: bool = False) -> dict[str, float]:
    # More than bench ingest's 50,000: two workers' clock includes their group's join, a
    # few seconds that must not be most of it.
    n = 20_000 if quick else 200_000
    home = Path(tempfile.mkdtemp(prefix="tuneloop-bench-ingest-pg-"))
    home.chmod(0o755)  # the postgres user owns the cluster when this runs as root
    cfg = load_settings({
        "home": home, "kafka.bootstrap_servers": f"127.0.0.1:{free_port()}",
        "kafka.group_id": "bench-ingest", "kafka.partitions": PARTITIONS,
        "ingest.batch_size": 5000,
        "kafka.storage_engine": "memory",  # as bench ingest: the broker is not the subject
    })
    broker = EmbeddedBroker(cfg)
    server = LocalPostgres(home / "postgres")
    broker.start()
    server.start()
    loops = {"librdkafka": _librdkafka_loop, "one worker": _full_path,
             "two workers": _two_workers}
    results: dict[str, list[float]] = {}
    try:
        ensure_topics(cfg.kafka)
        size = _fill_topic(cfg, n)
        print(f"topic holds {n:,} events ({size / n:.0f} bytes each, {PARTITIONS} partitions) "
              f"on embedded tansu; Postgres on 127.0.0.1:{server.port}")
        orders = (("librdkafka", "one worker", "two workers"),
                  ("two workers", "one worker", "librdkafka"))
        for rnd, order in enumerate(orders):
            for side in order:
                tag = f"r{rnd}_{side.replace(' ', '_')}"
                run_cfg = _settings(cfg, f"bench-{tag}", server.new_database(tag))
                seconds = loops[side](run_cfg, n)
                results.setdefault(side, []).append(n / seconds)
                print(f"round {rnd + 1} {side:>12}: {n / seconds:>9,.0f} events/s")
                if side != "librdkafka":
                    landed = Store.of(run_cfg).counts()["feedback"]
                    assert landed == n, f"{side} landed {landed} of {n}"
    finally:
        server.stop()
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)
    best = {side: max(v) for side, v in results.items()}
    load = os.getloadavg()
    print(f"machine: {machine()}; load average after the run {load[0]:.2f}")
    print("events/s, best of 2 (median):")
    for side, label in (("librdkafka", "raw librdkafka consume + json.loads + commit"),
                        ("one worker", "tuneloop ingest into Postgres, one worker"),
                        ("two workers", "tuneloop ingest into Postgres, two workers")):
        print(f"  {label}: {best[side]:,.0f} ({statistics.median(results[side]):,.0f})")
    ratio = best["one worker"] / best["librdkafka"]
    speedup = best["two workers"] / best["one worker"]
    print(f"FIGURE ingest_pg_ratio={ratio:.3f}")
    print(f"FIGURE ingest_pg_two_workers_speedup={speedup:.3f}")
    print(f"FIGURE ingest_pg_events_per_s_per_worker={best['one worker']:.0f}")
    return {"ingest_pg_ratio": ratio, "ingest_pg_two_workers_speedup": speedup}
