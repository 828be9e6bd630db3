"""The ingest flow: drain ``feedback.v1`` into DuckDB until the topic is idle.

``tuneloop ingest`` runs it once, e.g. to land a backlog before a command that reads
it. The stack's steady ingest is not a flow: ``tuneloop up`` starts one long-running,
supervised consumer (``tuneloop.services.ingest.service``) that keeps its group membership.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task

from tuneloop.runtime.settings import load_settings
from tuneloop.services.feedback.topics import ensure_topics
from tuneloop.services.ingest.consumer import IngestConsumer
from tuneloop.services.ingest.shadow import land_shadow_pairs


@task(retries=3, retry_delay_seconds=2)
def ensure_feedback_topics() -> list[str]:
    """The feedback, dead-letter and shadow topics, created when missing."""
    settings = load_settings()
    return ensure_topics(settings.kafka, extra=(settings.serving.shadow_topic,))


@task
def land_shadow() -> int:
    """The gateway's shadow pairs (canary answers to production requests) into DuckDB."""
    return land_shadow_pairs(load_settings())


@task
def consume(max_batches: int | None) -> dict[str, Any]:
    """One consumer-group member, until the topic is idle; its statistics."""
    consumer = IngestConsumer(load_settings())
    try:
        stats = consumer.run(until_idle=True, max_batches=max_batches)
    finally:
        consumer.close()
    result = asdict(stats)
    result.pop("assignments")
    result["events_per_s"] = round(stats.events_per_s, 1)
    return result


@flow(name="ingest", log_prints=False)
def ingest(max_batches: int | None = None) -> dict[str, Any]:
    """Consume feedback until the topic is idle; returns the batch statistics."""
    ensure_feedback_topics()
    stats = consume(max_batches)
    stats["shadow_pairs"] = land_shadow()
    get_run_logger().info(
        "ingested %(inserted)d new events from %(polled)d polled; %(dead_letters)d dead letters, "
        "%(duplicates)d duplicates", stats,
    )
    return stats
