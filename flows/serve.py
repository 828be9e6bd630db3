"""Serve tuneloop's deployments from one long-running process (``tuneloop worker``)."""

from __future__ import annotations

from prefect import serve

from flows.ingest import ingest
from services.settings import Settings


def serve_all(settings: Settings) -> None:
    """Block, running scheduled and manually triggered runs of every deployment."""
    deployments = [
        ingest.to_deployment(
            name="continuous",
            interval=settings.ingest.interval_s,
            description="Drain feedback.v1 into DuckDB in micro-batches.",
            tags=["tuneloop", "ingest"],
            concurrency_limit=1,
        ),
    ]
    serve(*deployments, limit=2)  # type: ignore[arg-type]
