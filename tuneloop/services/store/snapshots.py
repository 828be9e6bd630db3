"""Dataset versions as immutable Parquet snapshots in object storage (``store.snapshots``).

With ``store.snapshots = true`` each dataset version is also written, once, to
``s3://<object_store.bucket>/datasets/<version>/`` as ``examples.parquet`` and
``preferences.parquet``, by DuckDB itself (its httpfs extension, loaded from the
``duckdb-ext-httpfs`` wheel). Curation writes the files, reads them back, checks they
hold the version's content and records each file's sha256 with the version; training
and the offline gate then read the version from its snapshot, each file's bytes checked
against the record first, so a version is the same bytes on every machine that trains
from it, and an altered snapshot is refused.

A store connection learns where snapshots go from a DuckDB session variable that
:func:`point` sets (``getvariable('tuneloop_snapshots')``), so the stage functions
that write and read versions keep their signatures. Each version's files go under a
prefix of their own (``<version>-<random>/``), so files left by a save that failed
before it was recorded never block the next one; a prefix no ``datasets`` row names is
such a leftover, safe to delete.
"""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from urllib.parse import urlsplit

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from tuneloop.runtime.settings import ObjectStoreSettings
from tuneloop.services.store.postgres import sql_literal

VARIABLE = "tuneloop_snapshots"
_HTTPFS = "duckdb-ext-httpfs"
FILES = ("examples", "preferences")


class SnapshotError(RuntimeError):
    """A snapshot is missing, already written, or not what its version recorded."""


def root_of(cfg: ObjectStoreSettings) -> str:
    """Where dataset versions go: ``s3://<bucket>/datasets/``."""
    return f"s3://{cfg.bucket}/datasets/"


def load(con: duckdb.DuckDBPyConnection, cfg: ObjectStoreSettings) -> None:
    """Let ``con``'s DuckDB reach the object store: httpfs and a secret for the bucket.
    Both belong to the DuckDB instance, not to a connection: once per instance."""
    con.execute(f"LOAD {sql_literal(str(_httpfs()))}")
    endpoint = urlsplit(cfg.endpoint)
    key = cfg.access_key_id.get_secret_value() if cfg.access_key_id else ""
    secret = cfg.secret_access_key.get_secret_value() if cfg.secret_access_key else ""
    con.execute(
        "CREATE OR REPLACE TEMPORARY SECRET tuneloop_s3 (TYPE s3, PROVIDER config, "
        f"KEY_ID {sql_literal(key)}, SECRET {sql_literal(secret)}, "
        f"REGION {sql_literal(cfg.region)}, ENDPOINT {sql_literal(endpoint.netloc)}, "
        f"URL_STYLE 'path', USE_SSL {'true' if endpoint.scheme == 'https' else 'false'}, "
        f"SCOPE {sql_literal(f's3://{cfg.bucket}/')})")


def point(con: duckdb.DuckDBPyConnection, cfg: ObjectStoreSettings) -> None:
    """Tell the connection ``con`` to snapshot dataset versions (a session variable)."""
    con.execute(f"SET VARIABLE {VARIABLE} = {sql_literal(root_of(cfg))}")


def _httpfs() -> Path:
    try:
        base = distribution(_HTTPFS).locate_file("duckdb_ext/extensions")
    except PackageNotFoundError:
        raise SnapshotError(f"store.snapshots is on, but {_HTTPFS} (DuckDB's httpfs) is not "
                            "installed: run `make setup`") from None
    return Path(str(base)) / f"v{duckdb.__version__}" / _platform() / "httpfs.duckdb_extension"


def _platform() -> str:
    row = duckdb.execute("PRAGMA platform").fetchone()
    return str(row[0]) if row else "linux_amd64"


def root(con: duckdb.DuckDBPyConnection) -> str | None:
    """Where ``con`` snapshots dataset versions; None when it does not."""
    row = con.execute(f"SELECT getvariable({sql_literal(VARIABLE)})").fetchone()
    return str(row[0]) if row and row[0] else None


def write(con: duckdb.DuckDBPyConnection, where: str,
          tables: dict[str, pa.Table]) -> dict[str, str]:
    """Write each of ``tables`` to ``<where><name>.parquet``, then read each file back;
    returns the sha256 of every file, by name, to be recorded with the version.

    Raises :class:`SnapshotError` if anything is there already: a snapshot is written
    once.
    """
    present = con.execute(f"SELECT count(*) FROM glob({sql_literal(where + '*')})").fetchone()
    if present and present[0]:
        raise SnapshotError(f"{where} holds files already; a dataset snapshot is written once")
    for name, table in tables.items():
        view = f"snapshot_{name}"
        con.register(view, table)
        try:
            con.execute(f"COPY (SELECT * FROM {view}) TO {sql_literal(f'{where}{name}.parquet')} "
                        "(FORMAT parquet, COMPRESSION zstd)")
        finally:
            con.unregister(view)
    return {name: hashlib.sha256(_fetch(con, f"{where}{name}.parquet")).hexdigest()
            for name in tables}


def read(con: duckdb.DuckDBPyConnection, where: str, name: str, sha256: str) -> pa.Table:
    """``<where><name>.parquet``, once its bytes match ``sha256``.

    Raises :class:`SnapshotError` naming the file when it is missing, unreadable or
    not the bytes that were recorded.
    """
    path = f"{where}{name}.parquet"
    data = _fetch(con, path)
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise SnapshotError(f"dataset snapshot {path} was altered: sha256 {actual[:12]}..., "
                            f"recorded {sha256[:12]}...; do not train from it")
    return pq.read_table(pa.BufferReader(data))


def _fetch(con: duckdb.DuckDBPyConnection, path: str) -> bytes:
    try:
        row = con.execute(f"SELECT content FROM read_blob({sql_literal(path)})").fetchone()
    except duckdb.Error as exc:
        raise SnapshotError(f"dataset snapshot {path} cannot be read: {exc}") from None
    if row is None:
        raise SnapshotError(f"dataset snapshot {path} is missing")
    return bytes(row[0])
