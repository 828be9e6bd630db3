"""Reading the dead letters ingest kept: what went wrong, grouped for people."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb


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
