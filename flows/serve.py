"""Serve tuneloop's deployments from one long-running process (``tuneloop worker``).

- ``ingest/continuous``: drains feedback into DuckDB every ``ingest.interval_s``.
- ``detect_drift/scheduled``: checks the current window every ``drift.interval_s`` and
  emits ``tuneloop.drift.detected`` when traffic has moved.
- ``curate/manual``, ``retrain/manual`` and ``canary/manual``: run from the Prefect UI
  or ``prefect deployment run``; the unattended chain from a drift event to a
  promoted adapter builds on them.
- ``check-production/nightly``: production on the golden set on ``canary.freeze_schedule``;
  a fall below the threshold freezes promotions.
"""

from __future__ import annotations

from prefect import serve

from flows.canary import canary, check_production
from flows.curate import curate_flow
from flows.drift import detect_drift_flow
from flows.ingest import ingest
from flows.retrain import retrain
from services.settings import Settings


def serve_all(settings: Settings) -> None:
    """Block, running scheduled and manually triggered runs of every deployment."""
    deployments = [
        ingest.to_deployment(
            name="continuous", interval=settings.ingest.interval_s, concurrency_limit=1,
            description="Drain feedback.v1 into DuckDB in micro-batches.", tags=["tuneloop", "ingest"],
        ),
        detect_drift_flow.to_deployment(
            name="scheduled", interval=settings.drift.interval_s, concurrency_limit=1,
            description="Compare the current window with the reference; emit on drift.",
            tags=["tuneloop", "drift"],
        ),
        curate_flow.to_deployment(
            name="manual", concurrency_limit=1, tags=["tuneloop", "curation"],
            description="Curate a new immutable dataset version from feedback.",
        ),
        retrain.to_deployment(
            name="manual", concurrency_limit=1, tags=["tuneloop", "training"],
            description="Train a LoRA adapter on a dataset version; publish it as a candidate.",
        ),
        canary.to_deployment(
            name="manual", concurrency_limit=1, tags=["tuneloop", "canary"],
            description="Gate a candidate adapter offline, then live; promote or roll back.",
        ),
        check_production.to_deployment(
            name="nightly", cron=settings.canary.freeze_schedule, concurrency_limit=1,
            tags=["tuneloop", "canary"],
            description="Production on the golden set; freeze promotions below the threshold.",
        ),
    ]
    serve(*deployments, limit=3)  # type: ignore[arg-type]
