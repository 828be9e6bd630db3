"""Ingest's writes: prepared batches into the store, keyed, with their dead letters and
the consumer's offsets.

:func:`write_batch` lands a batch in one DuckDB transaction with ``ON CONFLICT DO
NOTHING`` on the table's key (``event_id`` for feedback) and on
``topic:partition:offset:crc`` (dead letters), so a batch replayed after a crash changes
nothing; :func:`write_isolating` bisects a batch that one row makes fail and
dead-letters that row with the store's error. Every topic ingest lands (feedback, the
gateway's shadow pairs) goes through these functions.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb
import pyarrow as pa

from tuneloop.services.feedback.contract import FeedbackEvent
from tuneloop.services.ingest.core import (
    DEAD_LETTERS_TABLE,
    ROW_ERRORS,
    DeadLetter,
    KeyedTable,
    PreparedBatch,
    RawRecord,
    event_row,
)
from tuneloop.services.store.database import insert_keyed
from tuneloop.services.store.postgres import execute_in_store, rejected_row, sql_literal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsumedOffsets:
    """Where a consumer group goes on in each partition once a batch is landed: the
    offset after the batch's last record, per (topic, partition)."""

    group: str
    next_offsets: dict[tuple[str, int], int]


def write_batch(con: duckdb.DuckDBPyConnection, batch: PreparedBatch,
                offsets: ConsumedOffsets | None = None) -> int:
    """Land a prepared batch in one transaction: its rows into ``batch.table``, its
    dead letters, both keyed, and ``offsets`` (the "offsets stored outside Kafka"
    pattern: a consumer seeks to them when it is given the partitions, so the rows and
    where to go on commit together or not at all); returns how many rows were new.

    Raises one of :data:`ROW_ERRORS` when a row cannot be stored, any other DuckDB error
    when the store is busy or broken; the transaction is rolled back either way.
    """
    con.execute("BEGIN TRANSACTION")
    try:
        inserted = 0
        if batch.rows:
            inserted = _insert_arrow(con, batch.table, _row_columns(batch.rows, batch.table))
        if batch.dead:
            _insert_arrow(con, DEAD_LETTERS_TABLE, _dead_letter_columns(batch.dead))
        if offsets is not None and offsets.next_offsets:
            _store_offsets(con, offsets)
        con.execute("COMMIT")
    except BaseException as exc:
        with contextlib.suppress(duckdb.Error):  # a failed COMMIT has ended it already
            con.execute("ROLLBACK")
        refused = rejected_row(exc)
        if refused is not None:
            raise refused from exc
        raise
    return inserted


def _store_offsets(con: duckdb.DuckDBPyConnection, offsets: ConsumedOffsets) -> None:
    now = datetime.now(UTC).isoformat()
    values = ", ".join(
        f"({sql_literal(offsets.group)}, {sql_literal(topic)}, {int(partition)}, {int(offset)}, "
        f"TIMESTAMPTZ {sql_literal(now)})"
        for (topic, partition), offset in sorted(offsets.next_offsets.items()))
    # The batch's offsets replace the stored ones. A late write by a member that lost the
    # partition can only take the group back (a replay, which the keyed writes absorb),
    # never ahead. One statement, the same in both stores' SQL, run by the store itself
    # (in Postgres, its own upsert on the key rather than a join in DuckDB).
    execute_in_store(
        con, "INSERT INTO ingest_offsets (consumer_group, topic, partition_id, next_offset, "
        f"updated_at) VALUES {values} ON CONFLICT (consumer_group, topic, partition_id) "
        "DO UPDATE SET next_offset = excluded.next_offset, updated_at = excluded.updated_at")


def forget_offsets(con: duckdb.DuckDBPyConnection, group: str,
                   partitions: Sequence[tuple[str, int]]) -> None:
    """Drop ``group``'s stored offsets of ``partitions``."""
    for topic, partition in partitions:
        con.execute("DELETE FROM ingest_offsets WHERE consumer_group = ? AND topic = ? AND "
                    "partition_id = ?", [group, topic, partition])


def stored_offsets(con: duckdb.DuckDBPyConnection, group: str,
                   partitions: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """The offset ``group`` goes on from in each of ``partitions`` that has one stored."""
    if not partitions:
        return {}
    rows = con.execute(
        "SELECT topic, partition_id, next_offset FROM ingest_offsets WHERE consumer_group = ?",
        [group]).fetchall()
    wanted = set(partitions)
    return {(str(t), int(p)): int(o) for t, p, o in rows if (str(t), int(p)) in wanted}


def _row_columns(rows: list[tuple[object, ...]], table: KeyedTable) -> list[pa.Array]:
    # executemany binds row by row (~4 ms each); an Arrow scan is one statement.
    columns = list(zip(*rows, strict=True))
    return [pa.array(col, type=f.type) for col, f in zip(columns, table.schema, strict=True)]


def _dead_letter_columns(dead: list[DeadLetter]) -> list[pa.Array]:
    now = datetime.now(UTC)
    return [
        pa.array([d.dead_letter_id for d in dead], pa.string()),
        pa.array([now] * len(dead), pa.timestamp("us", tz="UTC")),
        pa.array([d.record.topic for d in dead], pa.string()),
        pa.array([d.record.partition for d in dead], pa.int32()),
        pa.array([d.record.offset for d in dead], pa.int64()),
        pa.array([d.record.key.decode(errors="replace") if d.record.key else None
                  for d in dead], pa.string()),
        pa.array([d.event_id for d in dead], pa.string()),
        pa.array([d.reason for d in dead], pa.string()),
        pa.array([d.payload for d in dead], pa.binary()),
        pa.array([d.size for d in dead], pa.int64()),
        pa.array([d.sha256 for d in dead], pa.string()),
        pa.array([d.truncated for d in dead], pa.bool_()),
    ]


def write_isolating(con: duckdb.DuckDBPyConnection, batch: PreparedBatch,
                    keep_raw: bool = False, offsets: ConsumedOffsets | None = None,
                    on_rejected: Callable[[list[DeadLetter]], None] | None = None) -> int:
    """:func:`write_batch`, and when a row makes it fail, find that row by bisection and
    dead-letter it with the store's error, so the partition moves on.

    The halves are written one by one; each write is keyed, so a crash in between
    replays to the same result. ``offsets`` go with the last write only. The rows the
    store rejected are handed to ``on_rejected`` before that write, then ``batch.dead``
    gains them.
    """
    try:
        return write_batch(con, batch, offsets)
    except ROW_ERRORS as exc:
        if not batch.rows:
            raise
        log.warning("a batch of %d rows failed to write (%s); isolating the row", len(batch.rows),
                    exc)
    rejected: list[DeadLetter] = []
    inserted = _write_halves(con, batch.table, batch.rows, batch.records, rejected, keep_raw)
    if on_rejected is not None and rejected:
        on_rejected(rejected)
    dead = batch.dead + rejected
    write_batch(con, PreparedBatch(dead=dead), offsets)
    batch.dead[:] = dead
    return inserted


def _write_halves(con: duckdb.DuckDBPyConnection, table: KeyedTable,
                  rows: list[tuple[object, ...]], records: list[RawRecord | None],
                  rejected: list[DeadLetter], keep_raw: bool) -> int:
    try:
        return write_batch(con, PreparedBatch(rows=rows, records=records, table=table))
    except ROW_ERRORS as exc:
        if len(rows) == 1:
            record = records[0] if records else None
            if record is None:
                raise
            rejected.append(DeadLetter(record, f"the store rejected it: {exc}", str(rows[0][0]),
                                       keep_raw))
            return 0
    mid = len(rows) // 2
    return (_write_halves(con, table, rows[:mid], records[:mid], rejected, keep_raw)
            + _write_halves(con, table, rows[mid:], records[mid:], rejected, keep_raw))


def _insert_arrow(con: duckdb.DuckDBPyConnection, table: KeyedTable, arrays: list[pa.Array]) -> int:
    """Insert an Arrow batch, skipping keys already present; returns the rows inserted."""
    return insert_keyed(con, table.name, table.key, pa.Table.from_arrays(arrays, schema=table.schema))


def insert_events(con: duckdb.DuckDBPyConnection, events: Sequence[FeedbackEvent]) -> int:
    """Land already-valid events directly (tests, demos, backfills); idempotent."""
    now = datetime.now(UTC)
    batch = PreparedBatch()
    for event in events:
        row, count = event_row(event, None, now)
        batch.redactions += count
        batch.rows.append(row)
        batch.records.append(None)
    return write_batch(con, batch)


def landed_event_ids(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The id of every event in ``feedback`` (for checks that nothing was lost or doubled)."""
    return [str(r) for (r,) in con.execute("SELECT event_id FROM feedback").fetchall()]


def events_per_request(con: duckdb.DuckDBPyConnection, request_ids: Sequence[str],
                       source: str) -> dict[str, int]:
    """How many stored events whose ``metadata.source`` is ``source`` each of
    ``request_ids`` has (0 for none): one each when nothing was lost or doubled."""
    counts = dict.fromkeys(request_ids, 0)
    if not counts:
        return counts
    rows = con.execute(
        "SELECT request_id, count(*) FROM feedback WHERE (metadata->>'source') = ? "
        "AND request_id IN (SELECT unnest(?::VARCHAR[])) GROUP BY request_id",
        [source, list(counts)]).fetchall()
    counts.update({str(r): int(n) for r, n in rows})
    return counts


def pairs_per_response(con: duckdb.DuckDBPyConnection,
                       response_ids: Sequence[str]) -> dict[str, int]:
    """How many landed shadow pairs each of ``response_ids`` has (0 for none)."""
    counts = dict.fromkeys(response_ids, 0)
    if not counts:
        return counts
    rows = con.execute(
        "SELECT response_id, count(*) FROM shadow_pairs WHERE response_id IN "
        "(SELECT unnest(?::VARCHAR[])) GROUP BY response_id", [list(counts)]).fetchall()
    counts.update({str(r): int(n) for r, n in rows})
    return counts
