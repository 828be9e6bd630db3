"""Small files that several processes read while one writes them."""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so a reader sees the old file or the new one,
    never half of one: into a temporary file of its own in the same folder, then renamed
    over ``path`` (two writers at once each rename a whole file; the last one wins).
    Values JSON cannot hold (datetimes, paths) are written as strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def private_sqlite(path: Path) -> sqlite3.Connection:
    """A SQLite file only its owner can read (created 0600, tightened if it was looser;
    SQLite gives its WAL and shared-memory files the same mode), in WAL mode with every
    commit synced, usable from any thread (callers hold their own lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db
