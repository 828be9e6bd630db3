"""The loop's figures for Prometheus and ``tuneloop status``, without touching the store.

Each process that owns a figure writes it to a small JSON file under ``<home>/run/``
(the ingest its rate and lag, the drift flow its score, the retrain and canary flows
their durations and verdicts); the gateway's ``/metrics`` reads them at scrape time.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tuneloop.runtime.files import write_json_atomic

LOOP_FILE = "loop-metrics.json"
OUTBOXES = ("outbox.sqlite", "gateway-outbox.sqlite", "gateway-shadow-outbox.sqlite")


def _read(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError):
        return {}


def record(home: Path, section: str, **values: Any) -> None:
    """Merge ``values`` into ``section`` of the loop's figures (atomic replace)."""
    path = Path(home) / "run" / LOOP_FILE
    data = _read(path)
    data.setdefault(section, {}).update(values, updated_at=time.time())
    write_json_atomic(path, data)


def read(home: Path) -> dict[str, Any]:
    """The loop's figures under ``home``; empty when none was recorded."""
    return _read(Path(home) / "run" / LOOP_FILE)


def outbox_backlog(home: Path) -> dict[str, int]:
    """Events waiting in each producer outbox under ``home`` (not yet acknowledged by Kafka)."""
    out = {}
    for name in OUTBOXES:
        path = Path(home) / name
        if not path.exists():
            continue
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
                out[name.removesuffix(".sqlite")] = int(
                    db.execute("SELECT count(*) FROM outbox").fetchone()[0])
        except sqlite3.Error:
            continue
    return out


class LoopCollector(Collector):
    """Prometheus figures of the whole loop, read from the files the components write."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)

    def collect(self) -> Iterator[Any]:
        """Every figure, read afresh at each scrape."""
        from tuneloop.services.ingest.service import read_status

        ingest = read_status(self.home) or {}
        if ingest:
            for key, help_ in (("inserted", "Feedback events landed in the store."),
                               ("dead_letters", "Events dead-lettered with a reason."),
                               ("duplicates", "Redelivered events kept once.")):
                c = CounterMetricFamily(f"tuneloop_ingest_{key}", help_)
                c.add_metric([], float(ingest.get(key) or 0))
                yield c
            g = GaugeMetricFamily("tuneloop_ingest_events_per_minute", "Recent ingest rate.")
            g.add_metric([], float(ingest.get("events_per_min") or 0))
            yield g
            if ingest.get("lag") is not None:
                g = GaugeMetricFamily("tuneloop_ingest_lag", "Feedback events not yet committed.")
                g.add_metric([], float(ingest["lag"]))
                yield g
        backlog = GaugeMetricFamily("tuneloop_outbox_backlog", "Events waiting in an outbox.",
                                    labels=["outbox"])
        for name, n in outbox_backlog(self.home).items():
            backlog.add_metric([name], n)
        yield backlog
        loop = read(self.home)
        drift = loop.get("drift") or {}
        if "score" in drift:
            g = GaugeMetricFamily("tuneloop_drift_score",
                                  "Novel share of the latest drift check: the estimated share "
                                  "of current traffic the reference does not cover.")
            g.add_metric([], float(drift["score"]))
            yield g
            g = GaugeMetricFamily("tuneloop_drift_detected", "1 when the latest check drifted.")
            g.add_metric([], 1.0 if drift.get("drifted") else 0.0)
            yield g
        seconds = GaugeMetricFamily("tuneloop_flow_last_duration_seconds",
                                    "Duration of the latest run of each loop flow.", labels=["flow"])
        for flow in ("retrain", "canary"):
            if (loop.get(flow) or {}).get("seconds") is not None:
                seconds.add_metric([flow], float(loop[flow]["seconds"]))
        yield seconds
        verdicts = CounterMetricFamily("tuneloop_loop_decisions", "Automatic decisions by kind.",
                                       labels=["stage", "verdict"])
        for key, n in (loop.get("decisions") or {}).items():
            stage, _, verdict = key.partition(":")
            verdicts.add_metric([stage, verdict], float(n))
        yield verdicts


def count_decision(home: Path, stage: str, verdict: str) -> None:
    """One more ``stage:verdict`` decision in the loop's counters."""
    path = Path(home) / "run" / LOOP_FILE
    data = _read(path)
    counts = dict(data.get("decisions") or {})
    counts[f"{stage}:{verdict}"] = int(counts.get(f"{stage}:{verdict}", 0)) + 1
    data["decisions"] = counts
    write_json_atomic(path, data)
