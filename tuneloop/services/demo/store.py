"""What only the demo reads from the store: the loop's activity in a span of time, the
first drift alarm after the shift, and the dataset behind a promotion.

The drift, canary and curation shells own these tables; these reads stay here until
those shells answer them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import duckdb

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
    alarms = con.execute("SELECT count(*) FROM drift_reports WHERE drifted AND created_at >= ?",
                         [since]).fetchall()[0][0]
    marks = ", ".join("?" for _ in RETRAIN_VERDICTS)
    retrains = con.execute(
        f"SELECT count(*) FROM canary_decisions WHERE stage = 'retrain' AND verdict IN ({marks}) "
        "AND created_at >= ?", [*RETRAIN_VERDICTS, since]).fetchall()[0][0]
    return Activity(int(alarms), int(retrains))


def first_alarm_clusters(con: duckdb.DuckDBPyConnection,
                         since: datetime) -> list[dict[str, Any]] | None:
    """The clusters of the first drift alarm at or after ``since``; None when none fired."""
    rows = con.execute("SELECT clusters FROM drift_reports WHERE drifted AND created_at >= ? "
                       "ORDER BY created_at LIMIT 1", [since]).fetchall()
    if not rows:
        return None
    raw = rows[0][0]
    return list(json.loads(raw) if isinstance(raw, str) else raw or [])


def dataset_report(con: duckdb.DuckDBPyConnection, version: str) -> dict[str, Any]:
    """The curation report of dataset ``version``; empty when the version does not exist."""
    rows = con.execute("SELECT report FROM datasets WHERE version = ?", [version]).fetchall()
    if not rows:
        return {}
    raw = rows[0][0]
    return dict(json.loads(raw) if isinstance(raw, str) else raw)


def promoted_at(con: duckdb.DuckDBPyConnection, version: str) -> datetime | None:
    """When ``version`` last moved to production (from the registry's history), if it did."""
    times = [h["occurred_at"] for h in history(con, version) if h["to_state"] == "production"]
    return max(times) if times else None
