"""What ``tuneloop status`` reads from the store and from the files the loop writes.

Each figure comes from the stage that owns it: the registry for adapters and state
changes, the drift and canary shells for their records, ingest for the dead letters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb

from tuneloop.services.canary.store import active_freeze, list_decisions, promoted_score
from tuneloop.services.drift.store import report_history
from tuneloop.services.evaluation.tasks import SCORE_NAMES
from tuneloop.services.ingest.dead_letters import DeadLetterGroup, dead_letter_reasons
from tuneloop.services.registry.store import history, list_adapters
from tuneloop.services.store.database import AnyStore, StoreBusyError

# The changes that decide what serves an alias; a publish or a canary start does not.
SERVING_CHANGES = ("production", "retired", "rejected")


@dataclass(frozen=True)
class AdapterLine:
    """One adapter as status lists it, with its golden-set scores.

    ``golden_score`` is the task's headline on the golden set when the version was
    trained (macro-F1 for labels, field F1 for json, chrF for text; ``golden_metric``
    names it); ``promoted_score`` the same task's score that its offline gate passed it
    with (served by vLLM), if it passed one. ``golden_accuracy`` and ``golden_macro_f1``
    are set for labels only.
    """

    version: str
    name: str
    state: str
    dataset: str | None
    created_at: datetime
    golden_accuracy: float | None
    golden_macro_f1: float | None
    golden_metric: str | None = None
    golden_score: float | None = None
    promoted_score: float | None = None


@dataclass(frozen=True)
class DriftLine:
    """The latest drift check."""

    created_at: datetime
    score: float
    p_value: float
    drifted: bool


@dataclass(frozen=True)
class StateChange:
    """The latest move into or out of production."""

    at: datetime
    version: str | None
    from_state: str | None
    to_state: str
    action: str
    reason: str


@dataclass(frozen=True)
class DecisionLine:
    """One gate's verdict."""

    created_at: datetime
    stage: str
    candidate: str | None
    incumbent: str | None
    verdict: str
    reason: str


@dataclass
class StoreFigures:
    """Everything status shows from the store; ``busy`` says why it is empty when it is."""

    path: str  # the DuckDB file, or the Postgres database without its password
    exists: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    dead_letters: list[DeadLetterGroup] = field(default_factory=list)
    adapters: list[AdapterLine] = field(default_factory=list)
    latest_drift: DriftLine | None = None
    freeze: dict[str, Any] | None = None
    decisions: list[DecisionLine] = field(default_factory=list)
    last_change: StateChange | None = None
    busy: str | None = None


def read_store_figures(store: AnyStore) -> StoreFigures:
    """The store's figures for status; a store another process holds past the store's
    lock timeout gives empty figures with ``busy`` set (status still answers). A store
    that does not exist yet gives empty figures. Raises ``duckdb.Error`` on a damaged file.
    """
    figures = StoreFigures(store.where, exists=store.exists())
    if not figures.exists:
        return figures
    try:
        figures.counts = store.counts()
        with store.connect() as con:
            _read_records(con, figures)
    except StoreBusyError as exc:
        figures.busy = str(exc)
    return figures


def _read_records(con: duckdb.DuckDBPyConnection, figures: StoreFigures) -> None:
    figures.dead_letters = dead_letter_reasons(con)
    figures.adapters = recent_adapters(con)
    figures.latest_drift = latest_drift(con)
    figures.last_change = last_serving_change(con)
    figures.freeze = active_freeze(con)
    figures.decisions = recent_decisions(con)


def recent_adapters(con: duckdb.DuckDBPyConnection, limit: int = 5) -> list[AdapterLine]:
    """The ``limit`` newest adapters of every alias, newest first."""
    newest = list_adapters(con)[-limit:][::-1]
    lines = []
    for a in newest:
        golden = a.metrics.get("golden")
        golden = golden if isinstance(golden, Mapping) else {}
        metric, score = golden_score(golden)
        lines.append(AdapterLine(a.version, a.name, a.state, a.dataset_version, a.created_at,
                                 _number(golden.get("accuracy")),
                                 _number(golden.get("macro_f1")), metric, score,
                                 _number(promoted_score(con, a.version))))
    return lines


def golden_score(report: Mapping[str, Any]) -> tuple[str | None, float | None]:
    """The task's headline in a training run's golden report (``EvalReport.to_dict()``)
    and the name of its metric; ``(None, None)`` when the report holds none.

    A report without ``kind`` (trained before json and text tasks) is a label task's. A
    label task whose golden set had no labels is judged by exact match, as the offline
    gate judges it.
    """
    kind = report.get("kind") or "label"
    if kind == "label":
        macro = _number(report.get("macro_f1"))
        if macro is not None:
            return "macro-F1", macro
        exact = _number(report.get("score"))
        exact = _number(report.get("exact_match")) if exact is None else exact
        return ("exact match", exact) if exact is not None else (None, None)
    score = _number(report.get("score"))
    return (SCORE_NAMES.get(str(kind), str(kind)), score) if score is not None else (None, None)


def _number(value: Any) -> float | None:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def latest_drift(con: duckdb.DuckDBPyConnection) -> DriftLine | None:
    """The newest drift check, if any ran."""
    rows = report_history(con, 1)
    if not rows:
        return None
    r = rows[0]
    return DriftLine(r.created_at, r.score, r.p_value, r.drifted)


def last_serving_change(con: duckdb.DuckDBPyConnection) -> StateChange | None:
    """The newest state change into production, retired or rejected, if any."""
    changes = [h for h in history(con) if h["to_state"] in SERVING_CHANGES]
    if not changes:
        return None
    h = changes[-1]
    return StateChange(h["occurred_at"], h["adapter_version"], h["from_state"], h["to_state"],
                       h["action"], h["reason"])


def recent_decisions(con: duckdb.DuckDBPyConnection, limit: int = 3) -> list[DecisionLine]:
    """The ``limit`` newest gate verdicts, newest first."""
    return [DecisionLine(d["created_at"], d["stage"], d["candidate"], d["incumbent"],
                         d["verdict"], d["reason"]) for d in list_decisions(con, limit)]

