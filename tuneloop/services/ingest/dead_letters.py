"""Reading the dead letters ingest kept: what went wrong, grouped for people, and which
of them can go back to the feedback topic after a fix (``tuneloop deadletters``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import duckdb

from tuneloop.services.feedback.contract import InvalidEvent, parse_event


@dataclass(frozen=True)
class DeadLetterGroup:
    """Dead letters whose reasons differ only in numbers (offsets, lengths), counted."""

    reason: str
    count: int


def dead_letter_reasons(con: duckdb.DuckDBPyConnection, limit: int = 5) -> list[DeadLetterGroup]:
    """The ``limit`` commonest dead-letter reasons, numbers masked as ``N``, commonest first."""
    rows = con.execute(
        "SELECT regexp_replace(reason, '[0-9]+', 'N', 'g') AS r, count(*) "
        "FROM dead_letters GROUP BY r ORDER BY 2 DESC LIMIT ?", [limit]).fetchall()
    return [DeadLetterGroup(str(reason), int(n)) for reason, n in rows]


def recent_reasons(con: duckdb.DuckDBPyConnection, limit: int) -> list[str]:
    """The reasons of the ``limit`` newest dead letters, newest first."""
    return [str(r) for (r,) in con.execute(
        "SELECT reason FROM dead_letters ORDER BY received_at DESC LIMIT ?", [limit]).fetchall()]


@dataclass(frozen=True)
class DeadLetterRow:
    """One dead letter as ``tuneloop deadletters list`` shows it."""

    dead_letter_id: str
    received_at: datetime
    source_topic: str
    event_id: str | None
    reason: str
    size: int | None
    truncated: bool
    replayed_at: datetime | None
    payload: bytes


def find_dead_letters(con: duckdb.DuckDBPyConnection, *, ids: Sequence[str] = (),
                      reason: str | None = None, limit: int = 50) -> list[DeadLetterRow]:
    """Dead letters newest first: those named by ``ids`` (all of them), else those whose
    reason contains ``reason`` (any when None), at most ``limit``."""
    where, args = "", list[object]()
    if ids:
        where, args = "WHERE dead_letter_id IN (SELECT unnest(?))", [list(ids)]
    elif reason:
        where, args = "WHERE contains(lower(reason), lower(?))", [reason]
    rows = con.execute(
        "SELECT dead_letter_id, received_at, source_topic, event_id, reason, size, "
        f"coalesce(truncated, false), replayed_at, payload FROM dead_letters {where} "
        "ORDER BY received_at DESC, dead_letter_id LIMIT ?", [*args, len(ids) or limit]).fetchall()
    return [DeadLetterRow(*r) for r in rows]


@dataclass(frozen=True)
class ReplayPlan:
    """What a replay sends (event id and payload), and what it leaves, with why."""

    send: list[tuple[str, str, bytes]] = field(default_factory=list)  # (dead letter, event, bytes)
    skip: list[tuple[str, str]] = field(default_factory=list)  # (dead letter, why)


def replay_plan(rows: Sequence[DeadLetterRow], feedback_topic: str, max_bytes: int,
                again: bool = False) -> ReplayPlan:
    """Which dead letters can go back to ``feedback_topic``: those of that topic, kept
    whole, not replayed before (unless ``again``), that the contract now accepts (after a
    fix: an upgrade, a corrected key). Pure."""
    plan = ReplayPlan()
    for row in rows:
        if row.source_topic != feedback_topic:
            plan.skip.append((row.dead_letter_id, f"from {row.source_topic}, not {feedback_topic}"))
        elif row.truncated:
            plan.skip.append((row.dead_letter_id, f"only part of its {row.size} bytes was kept"))
        elif row.replayed_at is not None and not again:
            plan.skip.append((row.dead_letter_id, f"replayed at {row.replayed_at:%Y-%m-%d %H:%M}"))
        else:
            try:
                event = parse_event(bytes(row.payload), max_bytes)
            except InvalidEvent as exc:
                plan.skip.append((row.dead_letter_id, f"still refused: {exc.reason}"))
                continue
            plan.send.append((row.dead_letter_id, str(event.event_id), bytes(row.payload)))
    return plan


def mark_replayed(con: duckdb.DuckDBPyConnection, ids: Sequence[str], at: datetime) -> None:
    """Record that the dead letters ``ids`` were sent back to the feedback topic at ``at``."""
    con.execute("UPDATE dead_letters SET replayed_at = ? WHERE dead_letter_id IN "
                "(SELECT unnest(?))", [at, list(ids)])
