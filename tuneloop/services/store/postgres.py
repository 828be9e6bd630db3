"""The operational store in Postgres (``store.url``): the same tables, the same SQL.

Every stage talks to the store through a DuckDB connection and DuckDB's SQL. With
``store.url`` set, that connection is an in-memory DuckDB with the Postgres database
attached through DuckDB's postgres extension and made the default catalog (``USE``):
each stage's statements then read and write the Postgres tables unchanged. There is no
second copy of any query per backend; DuckDB remains the engine that runs curation's,
drift's and the reports' analytical SQL, over rows it scans from Postgres in binary.

The extension is loaded from the ``duckdb-ext-postgres`` wheel (its files sit in the
layout of a DuckDB extension directory), so nothing is downloaded at run time. It loads
only into the DuckDB version it was built for, hence DuckDB's exact pin.

What Postgres changes:

* No file lock. Postgres serialises conflicting writes itself, so any number of
  processes (ingest workers among them) hold connections at once. A DuckDB cursor is
  one transaction scope; each :meth:`PostgresStore.connect` hands out its own.
* The schema is made with Postgres's own DDL (:func:`postgres_ddl`): sequences and
  column defaults are not expressible through the extension.
* ``feedback.seq`` orders feedback for curation's watermark, which must never see a
  lower number commit after a higher one. With several writers a sequence alone does
  not promise that, so writers of a table take a transaction-scoped advisory lock
  (:func:`insert_new`) before they draw numbers: their commits, and their numbers,
  come in one order.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from urllib.parse import quote, urlsplit

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from tuneloop.runtime.settings import ObjectStoreSettings

log = logging.getLogger(__name__)

# The attached database's name inside DuckDB.
CATALOG = "pg"
# pg_advisory_xact_lock keys: the schema's creation; with a table's name hashed, the
# writers of that table (see insert_new).
SCHEMA_LOCK = 0x74756E65_0001
# The store itself, held by a unit of work (PostgresStore.connect).
STORE_LOCK = 0x74756E65_0003
TABLE_LOCKS = 0x7475_6E65

_EXTENSION_PACKAGE = "duckdb-ext-postgres"
_SHARED: dict[tuple[str, str], PostgresStore] = {}
_SHARED_GUARD = threading.Lock()


def extension_directory() -> Path:
    """The DuckDB extension directory the ``duckdb-ext-postgres`` wheel installed."""
    try:
        return Path(str(distribution(_EXTENSION_PACKAGE).locate_file("duckdb_ext/extensions")))
    except PackageNotFoundError:
        raise RuntimeError(
            f"store.url names a Postgres database, but {_EXTENSION_PACKAGE} (DuckDB's postgres "
            "extension) is not installed: run `make setup`, or pip install "
            f"'{_EXTENSION_PACKAGE}=={duckdb.__version__}.*'") from None


def postgres_ddl(statement: str) -> str:
    """A DDL statement of :data:`~tuneloop.services.store.database.SCHEMA` in Postgres's
    types: DuckDB's ``DOUBLE``, ``BLOB`` and ``FLOAT[]`` are Postgres's ``DOUBLE
    PRECISION``, ``BYTEA`` and ``REAL[]``; the rest is common to both."""
    text = re.sub(r"\bDOUBLE\b(?! PRECISION)", "DOUBLE PRECISION", statement)
    text = re.sub(r"\bBLOB\b", "BYTEA", text)
    return re.sub(r"\bFLOAT\[\]", "REAL[]", text)


# What Postgres adds to the shared schema: the extension writes every column of a row,
# so a column it is not given arrives as NULL, not as its default; feedback's sequence
# number is therefore drawn by a trigger.
POSTGRES_SCHEMA: tuple[str, ...] = (
    """
    CREATE OR REPLACE FUNCTION tuneloop_feedback_seq() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.seq IS NULL THEN
            NEW.seq := nextval('feedback_seq');
        END IF;
        RETURN NEW;
    END $$
    """,
    "CREATE OR REPLACE TRIGGER feedback_seq BEFORE INSERT ON feedback FOR EACH ROW "
    "EXECUTE FUNCTION tuneloop_feedback_seq()",
)

# Postgres cannot hold a NUL character in text; it is kept as U+FFFD instead.
NUL_REPLACEMENT = "\ufffd"

# Postgres's own messages for a row it refuses (SQLSTATE classes 22, data exception, and
# 23, integrity constraint violation), as the extension passes them on in a plain
# duckdb.Error. Anything else (a lost connection, a full disk, a key another writer
# slipped in) stays the batch's error, and the batch is written again.
_REFUSED_ROW = re.compile(
    r"ERROR:\s+(null value in column|.*violates (not-null|check|foreign key) "
    r"constraint|invalid byte sequence|invalid input syntax|invalid input value|.*out of "
    r"range|value too long|unsupported Unicode escape|character with byte sequence|"
    r"date/time field value out of range|numeric field overflow)", re.S)


class RejectedRow(ValueError):
    """Postgres refused a row's values: a data exception or a violated constraint."""


def rejected_row(exc: BaseException) -> RejectedRow | None:
    """``exc`` as a :class:`RejectedRow` when it is Postgres refusing a row, else None."""
    if isinstance(exc, duckdb.Error) and _REFUSED_ROW.search(str(exc)):
        return RejectedRow(str(exc))
    return None


def sql_literal(text: str) -> str:
    """``text`` as an SQL string literal (standard quoting, the same in both stores)."""
    return "'" + text.replace("'", "''") + "'"


def execute_native(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Run ``sql`` in Postgres itself, in ``con``'s transaction when one is open."""
    con.execute(f"CALL postgres_execute({sql_literal(CATALOG)}, {sql_literal(sql)})")


def execute_in_store(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Run a statement written in the SQL both stores speak (no parameters) in the store
    itself: Postgres runs it natively, the DuckDB file through ``con``."""
    if is_postgres(con):
        execute_native(con, sql)
    else:
        con.execute(sql)


def is_postgres(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether ``con`` is a :class:`PostgresStore` connection."""
    row = con.execute("SELECT type FROM duckdb_databases() WHERE database_name = "
                      "current_database()").fetchone()
    return bool(row and row[0] == "postgres")


def insert_new(con: duckdb.DuckDBPyConnection, table: str, key: str, rows: pa.Table) -> int:
    """:func:`~tuneloop.services.store.database.insert_keyed` in Postgres.

    The extension's ``ON CONFLICT`` joins the batch with a scan of the whole table and
    hands the rows on out of order; instead, the keys already present are looked up in
    Postgres (its index), and the new rows go in by ``COPY`` in their order. Writers of
    one table queue on a transaction-scoped advisory lock, so no other writer slips the
    same key in between, and ``feedback.seq`` numbers commit in the order they were
    drawn (see the module's note).
    """
    from tuneloop.services.store.database import registered

    execute_native(con, f"SELECT pg_advisory_xact_lock({TABLE_LOCKS}, hashtext({sql_literal(table)}))")
    keys = [str(k) for k in rows.column(key).to_pylist()]
    present: set[str] = set()
    for start in range(0, len(keys), 2000):
        chunk = ", ".join(sql_literal(k) for k in keys[start:start + 2000])
        native = f"SELECT {key}::text FROM {table} WHERE {key} = ANY(ARRAY[{chunk}]::text[])"
        present.update(str(r[0]) for r in con.execute(
            f"SELECT * FROM postgres_query({sql_literal(CATALOG)}, {sql_literal(native)})").fetchall())
    if present:
        rows = rows.filter(pc.invert(pc.is_in(rows.column(key).cast(pa.string()),
                                               value_set=pa.array(sorted(present), pa.string()))))
    if rows.num_rows:
        names = ", ".join(rows.schema.names)
        with registered(con, f"incoming_{table}", rows) as view:
            con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {view}")
    return int(rows.num_rows)


def select_native(con: duckdb.DuckDBPyConnection, table: str, columns: Sequence[str],
                  key: str, keys: Sequence[str], equal: Mapping[str, str]) -> pa.Table:
    """:func:`~tuneloop.services.store.database.select_keyed` in Postgres."""
    parts = []
    conditions = "".join(f" AND {name} = {sql_literal(value)}" for name, value in equal.items())
    chunks = [keys[start:start + 2000] for start in range(0, len(keys), 2000)] or [[]]
    for chunk in chunks:
        listed = ", ".join(sql_literal(str(k)) for k in chunk)
        native = (f"SELECT {', '.join(columns)} FROM {table} WHERE {key} = ANY(ARRAY[{listed}]"
                  f"::text[]){conditions}")
        parts.append(con.execute(f"SELECT * FROM postgres_query({sql_literal(CATALOG)}, "
                                 f"{sql_literal(native)})").fetch_arrow_table())
    return pa.concat_tables(parts)


def where(url: str) -> str:
    """``url`` without its password, for status lines and errors."""
    if "://" in url:
        parts = urlsplit(url)
        try:
            host = parts.hostname or "localhost"
            port = f":{parts.port}" if parts.port else ""
        except ValueError:  # several hosts: shown as given, without the credentials
            host, port = parts.netloc.rsplit("@", 1)[-1], ""
        user = f"{parts.username}@" if parts.username else ""
        return f"postgresql://{user}{host}{port}{parts.path}"
    fields = dict(re.findall(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", url))
    shown = {k: v for k, v in fields.items() if "password" not in k}
    return "postgres " + " ".join(f"{k}={v}" for k, v in shown.items())


class PostgresStore:
    """The operational store in a Postgres database (see the module's note).

    A unit of work (:meth:`connect`) holds the store as the DuckDB file is held: one at
    a time, by a lock in Postgres that any machine reaching the database honours, so the
    registry's version numbers, a state change's plan and curation's watermark stay as
    consistent as on the file. Ingest's writes are the exception (``exclusive=False``):
    keyed, under their tables' locks, they run beside everything else, several workers
    at once.

    >>> store = PostgresStore("postgresql://tuneloop@127.0.0.1:5432/tuneloop")
    >>> with store.connect() as con:
    ...     con.execute("SELECT count(*) FROM feedback").fetchone()
    """

    def __init__(self, url: str, lock_timeout_s: float = 120.0,
                 snapshots: ObjectStoreSettings | None = None) -> None:
        self.url = url
        self.lock_timeout_s = lock_timeout_s
        self.snapshots = snapshots
        self.where = where(url)
        self._database: duckdb.DuckDBPyConnection | None = None
        self._pid = 0
        self._guard = threading.Lock()

    @classmethod
    def shared(cls, url: str, lock_timeout_s: float = 120.0,
               snapshots: ObjectStoreSettings | None = None) -> PostgresStore:
        """The process's one store for ``url``: its attached DuckDB is made once."""
        key = (url, snapshots.model_dump_json() if snapshots is not None else "")
        with _SHARED_GUARD:
            store = _SHARED.get(key)
            if store is None:
                store = _SHARED[key] = cls(url, lock_timeout_s, snapshots)
            return store

    def exists(self) -> bool:
        """Whether the database answers (a store is made on its first connection)."""
        try:
            self._attached()
        except duckdb.Error:
            return False
        return True

    def _attached(self) -> duckdb.DuckDBPyConnection:
        """The process's DuckDB with the database attached and the schema made, once per
        process. A forked child attaches anew; the parent's DuckDB is left untouched
        (closing it would end the parent's sessions)."""
        with self._guard:
            if self._database is None or self._pid != os.getpid():
                if self._database is not None:
                    _INHERITED.append(self._database)
                self._database = self._attach()
                self._pid = os.getpid()
            return self._database

    def _attach(self) -> duckdb.DuckDBPyConnection:
        db = duckdb.connect(config={"extension_directory": str(extension_directory()),
                                    "autoinstall_known_extensions": False,
                                    "autoload_known_extensions": False})
        try:
            db.execute("LOAD postgres")
            db.execute(f"SET GLOBAL pg_null_byte_replacement = {sql_literal(NUL_REPLACEMENT)}")
            # Each statement sees what committed before it: a writer that waited for a
            # table's lock then finds the rows of the writer before it (insert_new).
            db.execute(f"ATTACH {sql_literal(_with_application_name(self.url))} AS {CATALOG} "
                       "(TYPE postgres, ISOLATION_LEVEL 'READ COMMITTED')")
            db.execute(f"USE {CATALOG}")
            _make_schema(db)
            if self.snapshots is not None:
                from tuneloop.services.store import snapshots

                snapshots.load(db, self.snapshots)
        except duckdb.Error as exc:
            db.close()
            raise _without_url(exc, self.url, self.where) from None
        return db

    @contextmanager
    def connect(self, exclusive: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection for one unit of work, the store held meanwhile (``exclusive``)
        or shared with other writers (ingest's keyed writes).

        Raises :class:`~tuneloop.services.store.database.StoreBusyError` naming the
        holder when another unit keeps the store past ``lock_timeout_s``.
        """
        database = self._attached()
        lock = database.cursor() if exclusive else None
        con = database.cursor()
        try:
            if lock is not None:
                self._hold(lock)
            con.execute(f"USE {CATALOG}")
            if self.snapshots is not None and exclusive:  # ingest never reads versions
                from tuneloop.services.store import snapshots

                snapshots.point(con, self.snapshots)
            yield con
        except duckdb.Error as exc:
            shown = _without_url(exc, self.url, self.where)
            if shown is exc:
                raise
            raise shown from None
        finally:
            con.close()
            if lock is not None:
                with contextlib.suppress(duckdb.Error):
                    lock.execute("ROLLBACK")  # ends the transaction: the lock goes with it
                lock.close()

    def _hold(self, lock: duckdb.DuckDBPyConnection) -> None:
        """Take the store's lock in a transaction of its own, kept open for the unit."""
        from tuneloop.services.store.database import StoreBusyError

        lock.execute(f"USE {CATALOG}")
        lock.execute("BEGIN TRANSACTION")
        # The lock's transaction idles while the unit works: a server-wide idle timeout
        # must not end it (and the lock with it) under the unit.
        execute_native(lock, "SET LOCAL idle_in_transaction_session_timeout = 0")
        ask = (f"SELECT * FROM postgres_query({sql_literal(CATALOG)}, "
               f"{sql_literal(f'SELECT pg_try_advisory_xact_lock({STORE_LOCK})')})")
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.002
        while not lock.execute(ask).fetchall()[0][0]:
            if time.monotonic() >= deadline:
                raise StoreBusyError(
                    f"{self.where} stayed busy for {self.lock_timeout_s:.0f}s: "
                    f"{_holder(lock)} holds the store's lock. Try again, raise "
                    "store.lock_timeout_s, or stop that process if it is stuck.")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def counts(self) -> dict[str, int]:
        """Row count of every table, counted by Postgres."""
        from tuneloop.services.store.database import TABLES

        native = "SELECT " + ", ".join(f"(SELECT count(*) FROM {t}) AS {t}" for t in TABLES)
        with self.connect(exclusive=False) as con:
            row = con.execute(f"SELECT * FROM postgres_query({sql_literal(CATALOG)}, "
                              f"{sql_literal(native)})").fetchall()[0]
        return {table: int(n) for table, n in zip(TABLES, row, strict=True)}

    def close(self) -> None:
        """Drop the process's connections to the database."""
        with self._guard:
            if self._database is not None:
                self._database.close()
                self._database = None


def _make_schema(db: duckdb.DuckDBPyConnection) -> None:
    """Make the tables once per version of the schema. The DDL takes locks on the busy
    tables (ALTER TABLE: exclusive ones), so a process that finds the schema it knows
    already made runs none of it; processes that start together on a new database make
    it one after the other, under the schema's lock."""
    from tuneloop.services.store.database import MIGRATIONS, SCHEMA

    digest = hashlib.sha256("\n".join(
        (*SCHEMA, *POSTGRES_SCHEMA, *(m.__name__ for m in MIGRATIONS))).encode()).hexdigest()
    known = ("SELECT count(*) FROM pg_tables WHERE tablename = 'tuneloop_schema' AND "
             "schemaname = current_schema()")

    def made() -> bool:
        if not _native_count(db, known):
            return False
        return bool(_native_count(db, "SELECT count(*) FROM tuneloop_schema WHERE digest = "
                                      f"{sql_literal(digest)}"))

    if made():
        return
    db.execute("BEGIN TRANSACTION")
    try:
        execute_native(db, f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
        if made():
            db.execute("COMMIT")
            return
        execute_native(db, "CREATE TABLE IF NOT EXISTS tuneloop_schema (digest VARCHAR PRIMARY "
                           "KEY, applied_at TIMESTAMPTZ NOT NULL)")
        for ddl in SCHEMA:
            execute_native(db, postgres_ddl(ddl))
        for ddl in POSTGRES_SCHEMA:
            execute_native(db, ddl)
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            db.execute("ROLLBACK")
        raise
    db.execute("CALL pg_clear_cache()")
    for migrate in MIGRATIONS:  # idempotent, as on the DuckDB file
        migrate(db)
    execute_native(db, "INSERT INTO tuneloop_schema VALUES "
                       f"({sql_literal(digest)}, now()) ON CONFLICT DO NOTHING")


def _native_count(db: duckdb.DuckDBPyConnection, sql: str) -> int:
    row = db.execute(f"SELECT * FROM postgres_query({sql_literal(CATALOG)}, "
                     f"{sql_literal(sql)})").fetchone()
    return int(row[0]) if row else 0


def _holder(lock: duckdb.DuckDBPyConnection) -> str:
    """Who holds the store's lock: the backend's client, as ``application_name`` names it."""
    native = ("SELECT a.application_name, a.pid, extract(epoch FROM now() - a.xact_start) "
              "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
              f"WHERE l.locktype = 'advisory' AND l.granted AND l.objid = {STORE_LOCK & 0xFFFFFFFF} "
              "LIMIT 1")
    try:
        rows = lock.execute(f"SELECT * FROM postgres_query({sql_literal(CATALOG)}, "
                            f"{sql_literal(native)})").fetchall()
    except duckdb.Error:
        rows = []
    if not rows:
        return "another tuneloop process"
    name, backend, held = rows[0]
    return f"{name or 'a client'} (Postgres backend {backend}, holding it for {float(held or 0):.0f}s)"


def _with_application_name(url: str) -> str:
    """``url`` naming this process to Postgres, so a waiter learns who holds the store."""
    name = f"tuneloop pid {os.getpid()}: " + " ".join(sys.argv)[:40]
    name = re.sub(r"[^A-Za-z0-9 .:/_-]", "", name)
    if "://" in url:
        return url + ("&" if "?" in url else "?") + "application_name=" + quote(name)
    return f"{url} application_name='{name}'"


# A forked child's copies of its parent's DuckDB: kept, never closed (see _attached).
_INHERITED: list[duckdb.DuckDBPyConnection] = []


def _without_url(exc: duckdb.Error, url: str, shown: str) -> duckdb.Error:
    """``exc`` with the URL (and so its password) replaced by its printable form."""
    message = str(exc).replace(url, shown)
    return type(exc)(message) if message != str(exc) else exc
