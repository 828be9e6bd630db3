"""The loop's I/O shell: the snapshot of state the retrain guard decides over.

Everything comes from the store in one connection: the registry answers which adapter
of the alias is in its canary and which are candidates; the decision log
(``canary_decisions``) what the canary and earlier retrains recorded; the feedback which
labels production's dataset lacks. The decision itself is
:func:`tuneloop.services.loop.policy.why_not_retrain`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import duckdb

from tuneloop.services.curation.store import since_version
from tuneloop.services.loop.policy import (
    DriftCheck,
    HeldCandidate,
    LoopSnapshot,
    NewLabel,
    Published,
)
from tuneloop.services.registry import store as registry
from tuneloop.services.store.database import AnyStore


def read_snapshot(store: AnyStore, alias: str, run_key: str,
                  drift_triggered: bool = False) -> LoopSnapshot:
    """The state an automatic retrain of ``alias`` under ``run_key`` is decided on
    (``drift_triggered``: a drift alarm started it).

    Raises :class:`~tuneloop.services.store.database.StoreBusyError` when the store
    stays busy past its lock timeout.
    """
    with store.connect() as con:
        return snapshot(con, alias, run_key, drift_triggered)


def snapshot(con: duckdb.DuckDBPyConnection, alias: str, run_key: str,
             drift_triggered: bool = False) -> LoopSnapshot:
    """:func:`read_snapshot` on an open connection."""
    canary = registry.canary(con, alias)
    candidates = [a for a in registry.list_adapters(con, alias) if a.state == "candidate"]
    looks = offline_looks(con, [a.version for a in candidates])
    unjudged = [a for a in candidates if a.version not in looks]
    return LoopSnapshot(
        resumed=started(con, run_key),
        canary=canary.version if canary else None,
        unjudged=Published(unjudged[-1].version, unjudged[-1].created_at) if unjudged else None,
        held=tuple(HeldCandidate(a.version, datetime.fromtimestamp(at, UTC))
                   for a in candidates if (at := looks.get(a.version)) is not None),
        running_since=running_since(con),
        last_trained_at=last_trained_at(con),
        new_labels=tuple(new_labels(con, alias)),
        drift_triggered=drift_triggered,
        production=Published(*promoted) if (promoted := registry.production_since(
            con, alias)) else None,
        last_check=last_drift_check(con),
    )


def last_drift_check(con: duckdb.DuckDBPyConnection) -> DriftCheck | None:
    """The newest drift check's time and verdict."""
    rows = con.execute("SELECT created_at, drifted FROM drift_reports ORDER BY created_at DESC "
                       "LIMIT 1").fetchall()
    return DriftCheck(rows[0][0], bool(rows[0][1])) if rows else None


def started(con: duckdb.DuckDBPyConnection, run_key: str) -> bool:
    """Whether a retrain under ``run_key`` already recorded its start."""
    return bool(con.execute(
        "SELECT 1 FROM canary_decisions WHERE stage = 'retrain' AND verdict = 'start' "
        "AND (figures->>'run_key') = ? LIMIT 1", [run_key]).fetchall())


def offline_looks(con: duckdb.DuckDBPyConnection,
                  versions: Sequence[str]) -> dict[str, float | None]:
    """For each of ``versions`` the offline gate judged: when its latest look asked to look
    again (seconds since the epoch), or None when it did not."""
    if not versions:
        return {}
    rows = con.execute(
        "SELECT d.candidate, CAST(d.figures->>'next_look_at' AS DOUBLE) FROM canary_decisions d "
        "WHERE d.stage = 'offline' AND list_contains(?, d.candidate) AND d.created_at = ("
        "SELECT max(created_at) FROM canary_decisions e WHERE e.stage = 'offline' "
        "AND e.candidate = d.candidate)", [list(versions)]).fetchall()
    return {str(version): (float(at) if at is not None else None) for version, at in rows}


def running_since(con: duckdb.DuckDBPyConnection) -> datetime | None:
    """When the newest retrain that recorded a start, and no end after it under the same
    run key ('trained', 'failed', or 'skipped': curation found nothing new), started."""
    rows = con.execute(
        "SELECT s.created_at FROM canary_decisions s WHERE s.stage = 'retrain' "
        "AND s.verdict = 'start' AND NOT EXISTS (SELECT 1 FROM canary_decisions t "
        "WHERE t.stage = 'retrain' AND t.verdict IN ('trained', 'failed', 'skipped') "
        "AND t.created_at >= s.created_at AND (t.figures->>'run_key') = (s.figures->>'run_key')) "
        "ORDER BY s.created_at DESC LIMIT 1").fetchall()
    return rows[0][0] if rows else None


def last_trained_at(con: duckdb.DuckDBPyConnection) -> datetime | None:
    """When the last retrain finished training, if one ever did (a retrain skipped after
    training, its run having kept production's weights, counts)."""
    value: datetime | None = con.execute(
        "SELECT max(created_at) FROM canary_decisions WHERE stage = 'retrain' "
        "AND (verdict = 'trained' OR (verdict = 'skipped' AND "
        "(figures->>'trained') = 'true'))").fetchall()[0][0]
    return value


def new_labels(con: duckdb.DuckDBPyConnection, alias: str) -> list[NewLabel]:
    """Labels in feedback ingested since the dataset of ``alias``'s production adapter
    was curated that this dataset lacks (every label in all feedback, when there is no
    such dataset), with how many examples each has and when it first came; fewest
    examples first. Feedback a held candidate's version took counts: the next retrain's
    version carries it."""
    production = registry.production(con, alias)
    where, args = since_version(con, production.dataset_version if production else None, "f.")
    known, known_args = "", []
    if production is not None and production.dataset_version is not None:
        known = (" AND f.label NOT IN (SELECT e.label FROM dataset_examples e "
                 "WHERE e.version = ? AND e.label IS NOT NULL)")
        known_args = [production.dataset_version]
    rows = con.execute(
        f"SELECT f.label, count(*), min(f.ingested_at) FROM feedback f WHERE f.label IS NOT "
        f"NULL{where}{known} GROUP BY f.label ORDER BY 2, 1", [*args, *known_args]).fetchall()
    return [NewLabel(r[0], int(r[1]), r[2]) for r in rows]
