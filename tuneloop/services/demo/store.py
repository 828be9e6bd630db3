"""What the demo reads of the loop, through the stages' own shells: what the loop did on
its own in a span of time, and when a version was promoted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import duckdb

from tuneloop.services.canary.store import count_decisions
from tuneloop.services.drift.store import alarms_since
from tuneloop.services.registry.store import history

# Verdicts of the retrain stage that mean a training ran (or began).
RETRAIN_VERDICTS = ("start", "trained")


@dataclass(frozen=True)
class Activity:
    """What the loop did on its own since a moment."""

    drift_alarms: int
    retrains: int


def activity_since(con: duckdb.DuckDBPyConnection, since: datetime) -> Activity:
    """Drift alarms raised and retrains started at or after ``since``."""
    return Activity(alarms_since(con, since),
                    count_decisions(con, "retrain", RETRAIN_VERDICTS, since))


def promoted_at(con: duckdb.DuckDBPyConnection, version: str) -> datetime | None:
    """When ``version`` last moved to production (from the registry's history), if it did."""
    times = [h["occurred_at"] for h in history(con, version) if h["to_state"] == "production"]
    return max(times) if times else None
