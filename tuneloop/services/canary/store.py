"""The canary's records in DuckDB: decisions, deployment freezes, cached evaluation answers,
and the reads of the live window (ratings, shadow pairs). Every canary query is here.

- ``canary_decisions``: every verdict of every gate with its checks and figures. A
  live window's start is a decision too (verdict ``start``), so a rerun after a crash
  resumes the same window instead of starting a fresh, shorter one.
- ``freezes``: while a row has no ``lifted_at``, no promotion happens.
- ``eval_answers``: greedy answers by (model, example). The model key is the sha256
  of the adapter's weights (or the base model's id), so the same weights published
  twice, or an incumbent evaluated again, are not asked again.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import duckdb

from tuneloop.services.canary.core import Decision, Plan
from tuneloop.services.canary.live import Preference, Verdict
from tuneloop.services.feedback.signing import SIGNATURE
from tuneloop.services.registry import store as registry


def record_decision(con: duckdb.DuckDBPyConnection, decision: Decision,
                    run_id: str | None) -> str:
    """Insert one decision row; returns its id. Only the row: the loop's counters and the
    plot come with :func:`tuneloop.services.canary.records.record`."""
    decision_id = str(uuid.uuid4())
    con.execute(
        "INSERT INTO canary_decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [decision_id, datetime.now(UTC), run_id, decision.stage, decision.candidate,
         decision.incumbent, decision.verdict, decision.reason,
         json.dumps([c.__dict__ for c in decision.checks], default=str),
         json.dumps(decision.figures, default=str)],
    )
    return decision_id


def count_decisions(con: duckdb.DuckDBPyConnection, stage: str, verdicts: Sequence[str],
                    since: datetime) -> int:
    """Decisions of ``stage`` with one of ``verdicts`` taken at or after ``since``."""
    marks = ", ".join("?" for _ in verdicts)
    return int(con.execute(
        f"SELECT count(*) FROM canary_decisions WHERE stage = ? AND verdict IN ({marks}) "
        "AND created_at >= ?", [stage, *verdicts, since]).fetchall()[0][0])


def list_decisions(con: duckdb.DuckDBPyConnection, limit: int = 20,
                   candidate: str | None = None) -> list[dict[str, Any]]:
    """Newest first."""
    sql = ("SELECT decision_id, created_at, run_id, stage, candidate, incumbent, verdict, reason, "
           "checks, figures FROM canary_decisions")
    params: list[Any] = []
    if candidate is not None:
        sql += " WHERE candidate = ?"
        params.append(candidate)
    rows = con.execute(sql + " ORDER BY created_at DESC LIMIT ?", [*params, limit]).fetchall()
    keys = ("decision_id", "created_at", "run_id", "stage", "candidate", "incumbent", "verdict",
            "reason", "checks", "figures")
    out = []
    for r in rows:
        row = dict(zip(keys, r, strict=True))
        row["checks"] = _json(row["checks"])
        row["figures"] = _json(row["figures"])
        out.append(row)
    return out


def live_started_at(con: duckdb.DuckDBPyConnection, candidate: str) -> float | None:
    """When ``candidate``'s live window began (seconds since the epoch), if it did."""
    rows = con.execute(
        "SELECT figures FROM canary_decisions WHERE candidate = ? AND stage = 'live' AND "
        "verdict = 'start' ORDER BY created_at DESC LIMIT 1", [candidate]).fetchall()
    return float(_json(rows[0][0])["started_at"]) if rows else None


def latest_figures(con: duckdb.DuckDBPyConnection, candidate: str | None,
                   stage: str) -> dict[str, Any]:
    """The figures of ``candidate``'s newest ``stage`` decision; empty when it has none."""
    rows = con.execute(
        "SELECT figures FROM canary_decisions WHERE candidate = ? AND stage = ? "
        "ORDER BY created_at DESC LIMIT 1", [candidate, stage]).fetchall()
    return dict(_json(rows[0][0]) or {}) if rows else {}


def gate_plan(con: duckdb.DuckDBPyConnection, alias: str, candidate: str | None) -> Plan:
    """Where ``candidate`` (default: ``alias``'s newest candidate or canary) stands.

    Raises ``ValueError`` when there is no candidate, or ``candidate`` is another
    alias's, and ``RegistryError`` when it does not exist.
    """
    if candidate is None:
        newest = registry.latest_candidate(con, alias, in_canary=True)
        if newest is None:
            raise ValueError(f"no candidate adapter of {alias!r} to check; train one with "
                             "`tuneloop train`")
        candidate = newest.version
    adapter = registry.get_adapter(con, candidate)
    if adapter.alias != alias:
        raise ValueError(f"adapter {candidate} serves {adapter.alias!r}, not {alias!r}: "
                         f"run the canary with serving.alias={adapter.alias!r}")
    production = registry.production(con, alias)
    freeze = active_freeze(con)
    return Plan(candidate, adapter.state, production.version if production else None,
                freeze["reason"] if freeze else None, live_started_at(con, candidate))


def promoted_score(con: duckdb.DuckDBPyConnection, version: str) -> float | None:
    """The golden score ``version`` had when its offline gate passed, if it went through one."""
    rows = con.execute(
        "SELECT figures FROM canary_decisions WHERE candidate = ? AND stage = 'offline' AND "
        "verdict = 'pass' ORDER BY created_at DESC LIMIT 1", [version]).fetchall()
    if not rows:
        return None
    figures = _json(rows[0][0])
    score = figures.get("golden_score") or figures.get("golden_macro_f1") or \
        figures.get("golden_accuracy") or {}
    return score.get("candidate")


# ------------------------------------------------------------------ freezes
def active_freeze(con: duckdb.DuckDBPyConnection) -> dict[str, Any] | None:
    rows = con.execute(
        "SELECT freeze_id, created_at, reason, figures FROM freezes WHERE lifted_at IS NULL "
        "ORDER BY created_at LIMIT 1").fetchall()
    if not rows:
        return None
    freeze_id, created, reason, figures = rows[0]
    return {"freeze_id": freeze_id, "created_at": created, "reason": reason,
            "figures": _json(figures)}


def freeze(con: duckdb.DuckDBPyConnection, reason: str, figures: dict[str, Any]) -> str:
    """Stop promotions (a second freeze while one is active is kept as its own row)."""
    if not reason.strip():
        raise ValueError("a freeze needs a reason; pass --reason")
    freeze_id = str(uuid.uuid4())
    con.execute("INSERT INTO freezes VALUES (?, ?, ?, ?, NULL, NULL)",
                [freeze_id, datetime.now(UTC), reason, json.dumps(figures, default=str)])
    return freeze_id


def lift(con: duckdb.DuckDBPyConnection, reason: str) -> int:
    """Lift every active freeze; returns how many were lifted."""
    if not reason.strip():
        raise ValueError("lifting a freeze needs a reason; pass --reason")
    active = con.execute("SELECT count(*) FROM freezes WHERE lifted_at IS NULL").fetchall()[0][0]
    con.execute("UPDATE freezes SET lifted_at = ?, lift_reason = ? WHERE lifted_at IS NULL",
                [datetime.now(UTC), reason])
    return int(active)


# ------------------------------------------------------------------ the live window
def gateway_verdicts(con: duckdb.DuckDBPyConnection, alias: str, since: datetime,
                     until: datetime) -> list[Verdict]:
    """Every verdict (a rating or a correction) the gateway says it took on an answer of
    ``alias`` given in [since, until), in the order ingested, with its signature; which of
    them count is :func:`tuneloop.services.canary.live.judged_verdicts`'s to decide."""
    rows = con.execute(
        "SELECT event_id, request_id, adapter_version, rating, correction, completion, "
        f"user_id, (metadata->>'{SIGNATURE}') FROM feedback WHERE app = ? AND occurred_at >= ? "
        "AND occurred_at < ? AND (rating IS NOT NULL OR correction IS NOT NULL) AND "
        "(metadata->>'source') = 'gateway.feedback' ORDER BY seq", [alias, since, until]).fetchall()
    return [Verdict(str(r[0]), str(r[1]), r[2], r[3], r[4], str(r[5]), r[6], r[7]) for r in rows]


def gateway_preferences(con: duckdb.DuckDBPyConnection, alias: str, since: datetime,
                        until: datetime) -> list[Preference]:
    """Every side-by-side verdict the gateway says it took on an answer of ``alias`` given
    in [since, until), in the order ingested; which count is
    :func:`tuneloop.services.canary.live.count_preferences`'s to decide."""
    rows = con.execute(
        "SELECT event_id, request_id, adapter_version, (metadata->'preference'->>'chosen_version'),"
        " (metadata->'preference'->>'rejected_version'), user_id, "
        f"(metadata->>'{SIGNATURE}') FROM feedback WHERE app = ? AND occurred_at >= ? AND "
        "occurred_at < ? AND (metadata->>'source') = 'gateway.preference' ORDER BY seq",
        [alias, since, until]).fetchall()
    return [Preference(str(r[0]), str(r[1]), r[2], r[3], r[4], r[5], r[6]) for r in rows]


def shadow_answers(con: duckdb.DuckDBPyConnection, candidate: str, since: datetime
                   ) -> list[tuple[str, str | None, str | None, str | None]]:
    """The candidate's shadow pairs since ``since`` that it answered without error:
    production's answer, the candidate's, and the last label and correction users gave."""
    rows: list[tuple[str, str | None, str | None, str | None]] = con.execute(
        "SELECT s.production_completion, s.candidate_completion, f.label, f.correction "
        "FROM shadow_pairs s LEFT JOIN (SELECT request_id, arg_max(label, ingested_at) AS label,"
        " arg_max(correction, ingested_at) AS correction FROM feedback WHERE label IS NOT NULL"
        " OR correction IS NOT NULL GROUP BY request_id) f ON f.request_id = s.response_id "
        "WHERE s.candidate_version = ? AND s.occurred_at >= ? AND s.candidate_status < 400",
        [candidate, since]).fetchall()
    return rows


# ------------------------------------------------------------------ answer cache
def example_key(messages: Sequence[dict[str, str]], max_tokens: int) -> str:
    """The prompt (every turn but the answer) and the answer length, hashed."""
    blob = json.dumps([list(messages), max_tokens], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cached_answers(con: duckdb.DuckDBPyConnection, model_key: str,
                   keys: Iterable[str]) -> dict[str, str]:
    wanted = list(set(keys))
    if not wanted:
        return {}
    rows = con.execute(
        "SELECT example_key, answer FROM eval_answers WHERE model_key = ? AND "
        "list_contains(?, example_key)", [model_key, wanted]).fetchall()
    return dict(rows)


def save_answers(con: duckdb.DuckDBPyConnection, model_key: str,
                 answers: dict[str, str]) -> None:
    now = datetime.now(UTC)
    con.executemany("INSERT INTO eval_answers VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [(model_key, k, a, now) for k, a in answers.items()])


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value
