"""The I/O shell of drift detection: windows out of DuckDB, reports into it.

The reference window is, in order of preference:

1. the feedback the alias's **production adapter** was trained on (the registry's
   production of the alias -> its dataset version -> the source events of its
   examples);
2. a **pinned** time range (``drift.reference_start`` .. ``drift.reference_end``);
3. the **oldest** ``drift.reference_window_events`` events outside the current window.

The current window is the last ``drift.current_window_minutes`` minutes if set,
otherwise the last ``drift.current_window_events`` events; the two windows never
share an event. Windows follow the order in which tuneloop ingested the events (``seq``,
``ingested_at``), never the client's ``occurred_at``: a client whose clock runs years
ahead cannot freeze the current window. Events whose ``occurred_at`` is far ahead of or
behind their ingestion are counted in the report (``drift.clock_skew_s``,
``drift.max_event_age_s``). The check that uses them is :func:`tuneloop.services.drift.check.run_check`.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb

from tuneloop.runtime.settings import DriftSettings
from tuneloop.services.drift.core import DriftReport
from tuneloop.services.registry.store import production
from tuneloop.services.store.database import registered

log = logging.getLogger(__name__)

MIN_WINDOW_EVENTS = 20


class NotEnoughEvents(ValueError):
    """A window has too few events to test; more feedback (or a wider window) fixes it."""

    retriable = True


@dataclass(frozen=True)
class Window:
    """Events of one side of a comparison, in time order."""

    desc: str
    event_ids: list[str]
    texts: list[str]
    labels: list[str | None]
    # Events whose occurred_at is far from their ingestion: {"future": n, "past": n}.
    clock: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.event_ids)


def _window(desc: str, rows: Sequence[tuple[Any, ...]]) -> Window:
    return Window(
        desc=desc,
        event_ids=[str(r[0]) for r in rows],
        texts=[str(r[1]) for r in rows],
        labels=[r[2] for r in rows],
    )


def _app_clause(cfg: DriftSettings) -> tuple[str, list[Any]]:
    return (" AND app = ?", [cfg.app]) if cfg.app else ("", [])


def reference_window(
    con: duckdb.DuckDBPyConnection, cfg: DriftSettings, alias: str,
    exclude: Sequence[str] | None = None,
) -> Window | None:
    """The reference events (see the module docstring for the order of choice).

    ``alias`` names the served alias whose production adapter's training data is the
    reference. Returns None when neither that adapter nor a pin
    defines it and ``exclude`` (the current window) is still unknown: the oldest-N
    fallback must leave the current window out, so the caller loads that first.
    """
    app_sql, app_args = _app_clause(cfg)
    trained = _production_window(con, alias, app_sql, app_args)
    if trained is not None:
        return trained
    if cfg.reference_start and cfg.reference_end:
        rows = con.execute(
            "SELECT event_id, user_text, label FROM feedback WHERE ingested_at >= ? "
            f"AND ingested_at < ?{app_sql} ORDER BY seq, event_id",
            [cfg.reference_start, cfg.reference_end, *app_args],
        ).fetchall()
        return _window(
            f"pinned {cfg.reference_start.isoformat()} .. {cfg.reference_end.isoformat()}", rows
        )
    if exclude is None:
        return None
    with registered(con, "excluded_events", _ids_table(exclude)):
        rows = con.execute(
            "SELECT event_id, user_text, label FROM feedback WHERE event_id NOT IN "
            f"(SELECT event_id FROM excluded_events){app_sql} ORDER BY seq, event_id "
            "LIMIT ?",
            [*app_args, cfg.reference_window_events],
        ).fetchall()
    return _window(f"oldest {cfg.reference_window_events} events", rows)


def _production_window(con: duckdb.DuckDBPyConnection, alias: str, app_sql: str,
                       app_args: list[Any]) -> Window | None:
    """The feedback ``alias``'s production adapter was trained on, if it is enough."""
    adapter = production(con, alias)
    if adapter is None or adapter.dataset_version is None:
        return None
    dataset = adapter.dataset_version
    rows = con.execute(
        "SELECT f.event_id, f.user_text, f.label FROM feedback f WHERE f.event_id IN "
        "(SELECT source_event_id FROM dataset_examples WHERE version = ?)"
        f"{app_sql} ORDER BY f.seq, f.event_id",
        [dataset, *app_args],
    ).fetchall()
    if len(rows) >= MIN_WINDOW_EVENTS:
        return _window(f"production adapter {adapter.version} (dataset {dataset})", rows)
    log.warning("production adapter %s: dataset %s has %d source events; falling back",
                adapter.version, dataset, len(rows))
    return None


def current_window(
    con: duckdb.DuckDBPyConnection, cfg: DriftSettings, exclude: Sequence[str] = (),
    now: datetime | None = None,
) -> Window:
    """The most recent events, without any of ``exclude`` (the reference's ids)."""
    app_sql, app_args = _app_clause(cfg)
    with registered(con, "excluded_events", _ids_table(exclude)):
        if cfg.current_window_minutes:
            since = (now or datetime.now(UTC)) - timedelta(minutes=cfg.current_window_minutes)
            desc = f"last {cfg.current_window_minutes} minutes"
            rows = con.execute(
                "SELECT event_id, user_text, label, occurred_at, ingested_at FROM feedback "
                "WHERE ingested_at >= ? AND event_id NOT IN (SELECT event_id FROM "
                f"excluded_events){app_sql} ORDER BY seq, event_id",
                [since, *app_args],
            ).fetchall()
        else:
            desc = f"last {cfg.current_window_events} events"
            rows = con.execute(
                "SELECT * FROM (SELECT event_id, user_text, label, occurred_at, ingested_at, seq "
                f"FROM feedback WHERE event_id NOT IN (SELECT event_id FROM excluded_events)"
                f"{app_sql} ORDER BY seq DESC, event_id DESC LIMIT ?) ORDER BY seq, event_id",
                [*app_args, cfg.current_window_events],
            ).fetchall()
    window = _window(desc, rows)
    return replace(window, clock=clock_flags([(r[3], r[4]) for r in rows], cfg))


def clock_flags(stamps: Sequence[tuple[datetime, datetime]], cfg: DriftSettings) -> dict[str, int]:
    """How many ``(occurred_at, ingested_at)`` pairs claim a time more than
    ``cfg.clock_skew_s`` after their ingestion (``future``) or more than
    ``cfg.max_event_age_s`` before it (``past``). Pure."""
    ahead, age = timedelta(seconds=cfg.clock_skew_s), timedelta(seconds=cfg.max_event_age_s)
    return {"future": sum(occurred > ingested + ahead for occurred, ingested in stamps),
            "past": sum(occurred < ingested - age for occurred, ingested in stamps)}


def _ids_table(ids: Sequence[str]) -> Any:
    import pyarrow as pa

    return pa.table({"event_id": pa.array(list(ids), pa.string())})


def load_windows(con: duckdb.DuckDBPyConnection, cfg: DriftSettings,
                 alias: str) -> tuple[Window, Window]:
    """Reference and current window (``alias`` as in :func:`reference_window`); raises
    :class:`NotEnoughEvents` if either is too small."""
    ref = reference_window(con, cfg, alias)
    if ref is None:
        cur = current_window(con, cfg)
        ref = reference_window(con, cfg, alias, exclude=cur.event_ids)
        assert ref is not None
    else:
        cur = current_window(con, cfg, exclude=ref.event_ids)
    for name, window in (("reference", ref), ("current", cur)):
        if len(window) < MIN_WINDOW_EVENTS:
            raise NotEnoughEvents(
                f"{name} window ({window.desc}) has {len(window)} events, fewer than "
                f"{MIN_WINDOW_EVENTS}: ingest more feedback, or widen it with "
                "drift.reference_window_events / drift.current_window_events / "
                "drift.current_window_minutes"
            )
    return ref, cur


def save_report(con: duckdb.DuckDBPyConnection, report: DriftReport) -> str:
    """Persist ``report`` in ``drift_reports``; returns its new id."""
    report_id = f"drift-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    con.execute(
        "INSERT INTO drift_reports VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            report_id, datetime.now(UTC), report.reference_desc, report.current_desc,
            report.n_reference, report.n_current, report.score, report.p_value, report.drifted,
            json.dumps(report.methods()), json.dumps(report.clusters, allow_nan=False),
        ],
    )
    log.info("drift report %s saved: %s", report_id, report.summary())
    return report_id


@dataclass(frozen=True)
class ReportRow:
    report_id: str
    created_at: datetime
    score: float
    p_value: float
    drifted: bool
    n_reference: int
    n_current: int
    clusters: list[dict[str, Any]]
    min_novel_share: float | None = None  # the practical threshold the report decided with


def report_history(con: duckdb.DuckDBPyConnection, limit: int = 500) -> list[ReportRow]:
    """The latest ``limit`` reports, oldest first."""
    rows = con.execute(
        "SELECT * FROM (SELECT report_id, created_at, score, p_value, drifted, n_reference, "
        "n_current, clusters, (methods->>'min_novel_share') FROM drift_reports "
        "ORDER BY created_at DESC LIMIT ?) "
        "ORDER BY created_at",
        [limit],
    ).fetchall()
    return [
        ReportRow(
            report_id=r[0], created_at=r[1], score=float(r[2]), p_value=float(r[3]),
            drifted=bool(r[4]), n_reference=int(r[5]), n_current=int(r[6]),
            clusters=json.loads(r[7]) if isinstance(r[7], str) else list(r[7] or []),
            min_novel_share=float(r[8]) if r[8] is not None else None,
        )
        for r in rows
    ]


def alarms_since(con: duckdb.DuckDBPyConnection, since: datetime) -> int:
    """How many drift checks at or after ``since`` raised an alarm."""
    return int(con.execute("SELECT count(*) FROM drift_reports WHERE drifted AND created_at >= ?",
                           [since]).fetchall()[0][0])


def first_alarm_clusters(con: duckdb.DuckDBPyConnection,
                         since: datetime) -> list[dict[str, Any]] | None:
    """The clusters of the first drift alarm at or after ``since``; None when none fired."""
    rows = con.execute("SELECT clusters FROM drift_reports WHERE drifted AND created_at >= ? "
                       "ORDER BY created_at LIMIT 1", [since]).fetchall()
    if not rows:
        return None
    raw = rows[0][0]
    return list(json.loads(raw) if isinstance(raw, str) else raw or [])
