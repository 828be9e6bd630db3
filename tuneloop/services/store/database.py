"""The DuckDB file every stage shares, and the rule for sharing it.

DuckDB lets one process hold a database file read-write, and no other process may
open it at all meanwhile. tuneloop's processes (the long-running ingest, the drift,
curation and training flows, ``tuneloop status``) therefore take turns: each opens
the file only for the duration of one unit of work, under an exclusive advisory
lock on ``<db>.lock`` (``fcntl.flock``). A process that finds the file busy waits
in line for the lock (behind a turnstile, ``<db>.queue``, so a busy process cannot
take it straight back) instead of failing on DuckDB's own lock error, so no write is
lost and nothing crashes on contention. Units of work are kept short (one ingest
batch, one report) so waits stay short.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import duckdb
import pyarrow as pa

from tuneloop.runtime.settings import ObjectStoreSettings, Settings

if TYPE_CHECKING:
    from tuneloop.services.store.postgres import PostgresStore

log = logging.getLogger(__name__)


class StoreBusyError(TimeoutError):
    """Another process held the database longer than ``lock_timeout_s``; the message names it."""

    retriable = True


def holder(lock_path: Path) -> dict[str, Any] | None:
    """Who holds (or last held) the store: pid, command and since when, from the lock file."""
    try:
        return dict(json.loads(Path(lock_path).read_text() or "null") or {}) or None
    except (OSError, ValueError, TypeError):
        return None


SCHEMA: tuple[str, ...] = (
    # ``seq`` numbers feedback in the order it was written. Writes take turns on the file
    # (one process at a time, see Store), so a later commit always has a higher number:
    # curation's watermark cannot skip a batch that was prepared early and written late.
    "CREATE SEQUENCE IF NOT EXISTS feedback_seq",
    """
    CREATE TABLE IF NOT EXISTS feedback (
        event_id VARCHAR PRIMARY KEY,
        occurred_at TIMESTAMPTZ NOT NULL,
        ingested_at TIMESTAMPTZ NOT NULL,
        app VARCHAR NOT NULL,
        request_id VARCHAR NOT NULL,
        adapter_version VARCHAR,
        messages JSON NOT NULL,
        user_text VARCHAR NOT NULL,
        completion VARCHAR NOT NULL,
        rating DOUBLE,
        correction VARCHAR,
        label VARCHAR,
        language VARCHAR,
        user_id VARCHAR,
        metadata JSON,
        redactions INTEGER NOT NULL DEFAULT 0,
        source_topic VARCHAR,
        source_partition INTEGER,
        source_offset BIGINT,
        seq BIGINT DEFAULT nextval('feedback_seq')
    )
    """,
    "ALTER TABLE feedback ADD COLUMN IF NOT EXISTS seq BIGINT DEFAULT nextval('feedback_seq')",
    """
    CREATE TABLE IF NOT EXISTS dead_letters (
        dead_letter_id VARCHAR PRIMARY KEY,
        received_at TIMESTAMPTZ NOT NULL,
        source_topic VARCHAR NOT NULL,
        source_partition INTEGER NOT NULL,
        source_offset BIGINT NOT NULL,
        event_key VARCHAR,
        event_id VARCHAR,
        reason VARCHAR NOT NULL,
        payload BLOB NOT NULL
    )
    """,
    # What a dead letter keeps is capped (ingest.core.KEPT_BYTES); these describe the whole.
    "ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS size BIGINT",
    "ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS sha256 VARCHAR",
    "ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS truncated BOOLEAN",
    "ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS replayed_at TIMESTAMPTZ",
    """
    CREATE TABLE IF NOT EXISTS embeddings (
        content_hash VARCHAR NOT NULL,
        model VARCHAR NOT NULL,
        dim INTEGER NOT NULL,
        vector FLOAT[] NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (content_hash, model)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS drift_reports (
        report_id VARCHAR PRIMARY KEY,
        created_at TIMESTAMPTZ NOT NULL,
        reference_desc VARCHAR NOT NULL,
        current_desc VARCHAR NOT NULL,
        n_reference INTEGER NOT NULL,
        n_current INTEGER NOT NULL,
        score DOUBLE NOT NULL,
        p_value DOUBLE NOT NULL,
        drifted BOOLEAN NOT NULL,
        methods JSON NOT NULL,
        clusters JSON NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS datasets (
        version VARCHAR PRIMARY KEY,
        created_at TIMESTAMPTZ NOT NULL,
        content_hash VARCHAR NOT NULL,
        parent_versions JSON NOT NULL,
        filters JSON NOT NULL,
        report JSON NOT NULL,
        n_train INTEGER NOT NULL,
        n_validation INTEGER NOT NULL,
        n_test INTEGER NOT NULL
    )
    """,
    # Where the version's Parquet snapshot lies (services.store.snapshots), if it has one.
    "ALTER TABLE datasets ADD COLUMN IF NOT EXISTS snapshot VARCHAR",
    "ALTER TABLE datasets ADD COLUMN IF NOT EXISTS snapshot_files JSON",
    """
    CREATE TABLE IF NOT EXISTS dataset_examples (
        version VARCHAR NOT NULL,
        example_id VARCHAR NOT NULL,
        split VARCHAR NOT NULL,
        source_event_id VARCHAR,
        label VARCHAR,
        messages JSON NOT NULL,
        prompt VARCHAR NOT NULL,
        completion VARCHAR NOT NULL,
        PRIMARY KEY (version, example_id)
    )
    """,
    # A version's preference pairs (services.curation.preferences), for DPO.
    """
    CREATE TABLE IF NOT EXISTS dataset_preferences (
        version VARCHAR NOT NULL,
        pair_id VARCHAR NOT NULL,
        split VARCHAR NOT NULL,
        source_event_id VARCHAR,
        source VARCHAR NOT NULL,
        messages JSON NOT NULL,
        chosen VARCHAR NOT NULL,
        rejected VARCHAR NOT NULL,
        PRIMARY KEY (version, pair_id)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS golden_set (
        example_id VARCHAR PRIMARY KEY,
        added_at TIMESTAMPTZ NOT NULL,
        source_event_id VARCHAR,
        label VARCHAR,
        messages JSON NOT NULL,
        prompt VARCHAR NOT NULL,
        completion VARCHAR NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS adapters (
        version VARCHAR PRIMARY KEY,
        name VARCHAR NOT NULL UNIQUE,
        alias VARCHAR,
        created_at TIMESTAMPTZ NOT NULL,
        base_model VARCHAR NOT NULL,
        base_hash VARCHAR NOT NULL,
        dataset_version VARCHAR,
        path VARCHAR NOT NULL,
        sha256 VARCHAR NOT NULL,
        metrics JSON NOT NULL,
        state VARCHAR NOT NULL,
        run_key VARCHAR
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS shadow_pairs (
        pair_id VARCHAR PRIMARY KEY,
        occurred_at TIMESTAMPTZ NOT NULL,
        landed_at TIMESTAMPTZ NOT NULL,
        app VARCHAR NOT NULL,
        response_id VARCHAR NOT NULL,
        messages JSON NOT NULL,
        production_version VARCHAR,
        production_completion VARCHAR NOT NULL,
        production_latency_s DOUBLE,
        candidate_version VARCHAR NOT NULL,
        candidate_completion VARCHAR,
        candidate_status INTEGER NOT NULL,
        candidate_latency_s DOUBLE
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS deployments (
        deployment_id VARCHAR PRIMARY KEY,
        occurred_at TIMESTAMPTZ NOT NULL,
        adapter_version VARCHAR,
        from_state VARCHAR,
        to_state VARCHAR NOT NULL,
        action VARCHAR NOT NULL,
        reason VARCHAR NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS canary_decisions (
        decision_id VARCHAR PRIMARY KEY,
        created_at TIMESTAMPTZ NOT NULL,
        run_id VARCHAR,
        stage VARCHAR NOT NULL,
        candidate VARCHAR,
        incumbent VARCHAR,
        verdict VARCHAR NOT NULL,
        reason VARCHAR NOT NULL,
        checks JSON NOT NULL,
        figures JSON NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS freezes (
        freeze_id VARCHAR PRIMARY KEY,
        created_at TIMESTAMPTZ NOT NULL,
        reason VARCHAR NOT NULL,
        figures JSON NOT NULL,
        lifted_at TIMESTAMPTZ,
        lift_reason VARCHAR
    )
    """,
    # Where the ingest consumer group goes on in each partition, written in the same
    # transaction as the rows (services.ingest.store.write_batch).
    """
    CREATE TABLE IF NOT EXISTS ingest_offsets (
        consumer_group VARCHAR NOT NULL,
        topic VARCHAR NOT NULL,
        partition_id INTEGER NOT NULL,
        next_offset BIGINT NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (consumer_group, topic, partition_id)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS eval_answers (
        model_key VARCHAR NOT NULL,
        example_key VARCHAR NOT NULL,
        answer VARCHAR NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (model_key, example_key)
    )
    """,
)



def _columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    return {r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? AND "
        "table_catalog = current_database() AND table_schema = current_schema()", [table]
    ).fetchall()}


def _migrate_adapters(con: duckdb.DuckDBPyConnection) -> None:
    """Files made before the registry kept an alias column, or named the run key flow_run_id."""
    columns = _columns(con, "adapters")
    if "flow_run_id" in columns:
        con.execute("ALTER TABLE adapters RENAME COLUMN flow_run_id TO run_key")
    if "alias" not in columns:
        con.execute("ALTER TABLE adapters ADD COLUMN alias VARCHAR")
    # The vLLM name is "<alias>-<version>".
    con.execute("UPDATE adapters SET alias = left(name, length(name) - length(version) - 1) "
                "WHERE alias IS NULL")
    # Paths were absolute: a version's directory is <adapters_dir>/<version>, so the last
    # part is its path relative to the registry root, wherever the home moves.
    con.execute("UPDATE adapters SET path = regexp_extract(rtrim(path, '/'), '[^/]+$') "
                "WHERE starts_with(path, '/')")


# Run in order after SCHEMA on every first connection of a process; each is idempotent.
MIGRATIONS = (_migrate_adapters,)

TABLES = (
    "feedback",
    "shadow_pairs",
    "dead_letters",
    "embeddings",
    "drift_reports",
    "datasets",
    "dataset_examples",
    "dataset_preferences",
    "golden_set",
    "adapters",
    "deployments",
    "canary_decisions",
    "freezes",
    "eval_answers",
    "ingest_offsets",
)


@contextmanager
def registered(con: duckdb.DuckDBPyConnection, name: str, table: Any) -> Iterator[str]:
    """Expose an Arrow table (or DataFrame) to SQL as ``name`` for the block; yields the name."""
    con.register(name, table)
    try:
        yield name
    finally:
        # If the block's statement aborted the transaction, the caller's error is the one
        # to see, and the next ``register`` of the name replaces this table.
        with contextlib.suppress(duckdb.TransactionException):
            con.unregister(name)


def insert_keyed(con: duckdb.DuckDBPyConnection, table: str, key: str, rows: Any) -> int:
    """Insert ``rows`` (an Arrow table in ``table``'s column names) in their order, but
    none whose ``key`` is already in ``table``; returns how many were new. Rows of one
    call keep their order in ``feedback.seq``."""
    from tuneloop.services.store.postgres import insert_new, is_postgres

    if is_postgres(con):
        return insert_new(con, table, key, rows)
    names = ", ".join(rows.schema.names)
    with registered(con, f"incoming_{table}", rows) as view:
        return int(con.execute(
            f"INSERT INTO {table} ({names}) SELECT {names} FROM {view} "
            f"ON CONFLICT ({key}) DO NOTHING").fetchall()[0][0])


def select_keyed(con: duckdb.DuckDBPyConnection, table: str, columns: Sequence[str],
                 key: str, keys: Sequence[str], equal: Mapping[str, str] | None = None) -> Any:
    """The rows of ``table`` whose ``key`` is one of ``keys`` (and each column of
    ``equal`` has its value), ``columns`` only, as an Arrow table. In Postgres the keys
    are looked up through its index instead of scanning the table into DuckDB."""
    from tuneloop.services.store.postgres import is_postgres, select_native

    if is_postgres(con):
        return select_native(con, table, columns, key, keys, equal or {})
    where = "".join(f" AND t.{name} = ?" for name in (equal or {}))
    wanted = pa.table({key: pa.array([str(k) for k in keys], pa.string())})
    with registered(con, f"wanted_{table}", wanted) as view:
        return con.execute(
            f"SELECT {', '.join(f't.{c}' for c in columns)} FROM {table} t "
            f"JOIN {view} w ON t.{key} = w.{key} WHERE true{where}",
            list((equal or {}).values())).fetch_arrow_table()


class Store:
    """The shared DuckDB file, opened one process at a time.

    >>> store = Store(Path(".tuneloop/tuneloop.duckdb"))
    >>> with store.connect() as con:
    ...     con.execute("SELECT count(*) FROM feedback").fetchone()
    """

    @classmethod
    def of(cls, settings: Settings, lock_timeout_s: float | None = None) -> AnyStore:
        """The store ``settings`` name: the Postgres database of ``store.url``, else the
        DuckDB file (``store.path``, else the home's), waiting up to ``lock_timeout_s``
        (default ``store.lock_timeout_s``) for another process."""
        wait = settings.store.lock_timeout_s if lock_timeout_s is None else lock_timeout_s
        snapshots = settings.object_store if settings.store.snapshots else None
        if settings.store.url is not None:
            from tuneloop.services.store.postgres import PostgresStore

            return PostgresStore.shared(settings.store.url.get_secret_value(), wait, snapshots)
        return cls(settings.db_path, wait, snapshots)

    def __init__(self, path: Path, lock_timeout_s: float = 120.0,
                 snapshots: ObjectStoreSettings | None = None) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        self.snapshots = snapshots
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.queue_path = self.path.with_name(self.path.name + ".queue")
        self.lock_timeout_s = lock_timeout_s
        self._initialised = False

    @contextmanager
    def connect(self, exclusive: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        """Hold the database for one unit of work (always exclusive: DuckDB lets one
        process at a time open the file; ``exclusive`` is for the Postgres store).

        Raises :class:`StoreBusyError` if another process keeps it for longer than
        ``lock_timeout_s``. The connection is closed (and DuckDB's WAL flushed)
        before the lock is released, so the next holder sees every write.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._acquire(fd)
            # Who holds the file, for anyone who has to wait (see StoreBusyError).
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv)[:300],
                                      "since": time.time()}).encode(), 0)
            con = duckdb.connect(str(self.path))
            try:
                if not self._initialised:
                    for ddl in SCHEMA:
                        con.execute(ddl)
                    for migrate in MIGRATIONS:
                        migrate(con)
                    self._initialised = True
                if self.snapshots is not None and exclusive:  # ingest never reads versions
                    from tuneloop.services.store import snapshots

                    snapshots.load(con, self.snapshots)
                    snapshots.point(con, self.snapshots)
                yield con
            finally:
                con.close()
        finally:
            # Closing the descriptor releases the flock, also when the process dies.
            os.close(fd)

    def _acquire(self, fd: int) -> None:
        """Take the store's lock, in turn.

        A turnstile keeps a busy process from taking the file back the instant it let
        go: a waiter first takes ``<db>.queue`` and keeps it while it waits for the
        store, so whoever just released the store has to queue behind it. Without it,
        a long-running ingest that releases and retakes the file after every batch
        starves every other process.
        """
        deadline = time.monotonic() + self.lock_timeout_s
        queue = os.open(self.queue_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._take(queue, deadline, max_delay=0.01)
            self._take(fd, deadline, max_delay=0.05)
        finally:
            os.close(queue)  # the next in line may now queue for the store

    def _take(self, fd: int, deadline: float, max_delay: float) -> None:
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    who = holder(self.lock_path)
                    held_by = "another tuneloop process" if who is None else (
                        f"pid {who.get('pid')} ({who.get('command') or 'unknown command'}, "
                        f"holding it for {time.time() - float(who.get('since', time.time())):.0f}s)")
                    raise StoreBusyError(
                        f"{self.path} stayed busy for {self.lock_timeout_s:.0f}s: {held_by} "
                        f"holds {self.lock_path}. Try again, raise store.lock_timeout_s, or "
                        "stop that process if it is stuck."
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, max_delay)

    def exists(self) -> bool:
        """Whether the file was made (its first connection makes it)."""
        return self.path.exists()

    def counts(self) -> dict[str, int]:
        """Row count of every table."""
        with self.connect() as con:
            return {
                table: int(con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])
                for table in TABLES
            }


# Either store: both hand out DuckDB connections through connect().
AnyStore: TypeAlias = "Store | PostgresStore"
