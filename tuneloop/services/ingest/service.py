"""The long-running ingest: one member of the consumer group for the life of the stack.

``tuneloop up`` starts it (``tuneloop ingest --follow`` under a supervisor that restarts
it when it dies). It joins the group once and keeps its partitions, instead of joining
anew for every run. Every ``ingest.interval_s`` a side thread measures the group's lag,
lands the gateway's shadow pairs (when shadowing is on) and writes the figures to
``<home>/run/ingest-status.json``, which ``tuneloop status`` and the gateway's
``/metrics`` read without touching the store.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuneloop.runtime.files import write_json_atomic
from tuneloop.runtime.settings import Settings
from tuneloop.services.ingest.consumer import IngestConsumer, IngestStats

log = logging.getLogger(__name__)

STATUS_FILE = "ingest-status.json"


def status_path(home: Path) -> Path:
    return Path(home) / "run" / STATUS_FILE


@dataclass
class IngestStatus:
    """What the running ingest reports about itself."""

    pid: int
    started_at: str
    updated_at: str = ""
    inserted: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    polled: int = 0
    events_per_min: float = 0.0
    lag: int | None = None
    lag_error: str | None = None
    shadow_pairs: int = 0
    partitions: list[int] = field(default_factory=list)


def read_status(home: Path) -> dict[str, Any] | None:
    """The last figures the ingest wrote, or None when it never ran here."""
    try:
        return dict(json.loads(status_path(home).read_text()))
    except (FileNotFoundError, ValueError):
        return None


def _write(home: Path, status: IngestStatus) -> None:
    write_json_atomic(status_path(home), asdict(status))


def group_lag(settings: Settings) -> int:
    """Events on the feedback topic the group has not committed yet."""
    from tuneloop.services.feedback.topics import topic_offsets

    return sum(p.lag or 0 for p in topic_offsets(settings.kafka, settings.kafka.topic,
                                                 settings.kafka.group_id))


def follow(settings: Settings, stop: threading.Event) -> IngestStats:
    """Consume until ``stop`` is set, reporting figures every ``ingest.interval_s``."""
    from tuneloop.services.ingest.shadow import land_shadow_pairs

    status = IngestStatus(pid=os.getpid(), started_at=datetime.now(UTC).isoformat())
    consumer = IngestConsumer(settings)
    latest: list[IngestStats] = [IngestStats()]
    # The totals of earlier runs of this file are kept: a restart continues the counts.
    previous = read_status(settings.home) or {}
    carried = {k: int(previous.get(k) or 0) for k in ("inserted", "duplicates", "dead_letters",
                                                       "polled", "shadow_pairs")}

    def reporter() -> None:
        last_polled, last_t = 0, time.monotonic()
        while True:
            stats = latest[0]
            now = time.monotonic()
            status.events_per_min = round((stats.polled - last_polled) / max(now - last_t, 1e-9)
                                          * 60, 1)
            last_polled, last_t = stats.polled, now
            for key in ("inserted", "duplicates", "dead_letters", "polled"):
                setattr(status, key, carried[key] + getattr(stats, key))
            try:
                status.lag, status.lag_error = group_lag(settings), None
            except Exception as exc:  # noqa: BLE001 - reported, the consumer goes on
                status.lag, status.lag_error = None, f"{type(exc).__name__}: {exc}"
            if settings.serving.shadow_share > 0:
                try:
                    carried["shadow_pairs"] += land_shadow_pairs(settings)
                except Exception:
                    log.exception("landing shadow pairs failed; next try in %ss",
                                  settings.ingest.interval_s)
            status.shadow_pairs = carried["shadow_pairs"]
            status.partitions = sorted(p.partition for p in consumer.consumer.assignment())
            status.updated_at = datetime.now(UTC).isoformat()
            _write(settings.home, status)
            if stop.wait(settings.ingest.interval_s):
                return

    def should_stop(stats: IngestStats) -> bool:
        latest[0] = stats
        return stop.is_set()

    side = threading.Thread(target=reporter, name="ingest-reporter", daemon=True)
    side.start()
    try:
        stats = consumer.run(until_idle=False, stop=should_stop)
    finally:
        stop.set()
        consumer.close()
        side.join(timeout=30)
    latest[0] = stats
    log.info("ingest stopped: %d inserted, %d dead letters over %.0f s", stats.inserted,
             stats.dead_letters, stats.seconds)
    return stats
