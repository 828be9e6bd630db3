"""A Postgres server on this machine's loopback, from the machine's own PostgreSQL binaries.

For the tests, the benchmarks and trying the Postgres store on one machine
(``store.url``); production points ``store.url`` at a managed database or a
CloudNativePG cluster instead. ``initdb`` refuses to run as root, so as root the
cluster belongs to the ``postgres`` system user and its commands run through
``runuser``. The server listens on 127.0.0.1 only and trusts local connections: it is
a scratch database, not a deployment.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
from pathlib import Path

from tuneloop.runtime.processes import free_port

log = logging.getLogger(__name__)

DATABASE = "tuneloop"


def postgres_bin(name: str) -> str:
    """Path of a PostgreSQL server program (``initdb``, ``pg_ctl``, ``postgres``).

    Raises ``FileNotFoundError`` naming what to install when there is none.
    """
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if candidates:
        return candidates[-1]
    raise FileNotFoundError(f"no `{name}` (PostgreSQL server): install PostgreSQL 15 or later "
                            "(Debian: apt install postgresql), or point store.url at a running "
                            "database")


class LocalPostgres:
    """One Postgres cluster in ``data_dir``, served on ``127.0.0.1:port``. As root,
    ``data_dir``'s parents must let the ``postgres`` user through (``tempfile.mkdtemp()``
    in ``/tmp`` does)."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self._as_root = os.geteuid() == 0

    @property
    def url(self) -> str:
        """The ``store.url`` of its database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        if self._as_root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, check=False)

    def _check(self, argv: list[str], what: str) -> None:
        done = self._run(argv)
        if done.returncode != 0:
            raise RuntimeError(f"{what} failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()[-2000:]}")

    def start(self) -> LocalPostgres:
        """Make the cluster (first time), start the server and make the database."""
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if self._as_root:
                shutil.chown(self.data_dir, "postgres", "postgres")
            self._check([postgres_bin("initdb"), "-D", str(self.data_dir), "-U", "postgres",
                         "-A", "trust", "-E", "UTF8", "--no-instructions"], "initdb")
        socket_dir = self.data_dir  # the cluster's owner can write there; /tmp may be shared
        self._check([postgres_bin("pg_ctl"), "-D", str(self.data_dir), "-w", "-t", "60",
                     "-l", str(self.data_dir / "server.log"), "-o",
                     f"-p {self.port} -c listen_addresses=127.0.0.1 "
                     f"-c unix_socket_directories={socket_dir} -c fsync=on "
                     "-c max_connections=200", "start"], "pg_ctl start")
        created = self._run([postgres_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port),
                             "-U", "postgres", "-d", "postgres", "-tAc",
                             f"CREATE DATABASE {DATABASE}"])
        if created.returncode != 0 and "already exists" not in created.stderr:
            raise RuntimeError(f"CREATE DATABASE failed: {created.stderr.strip()}")
        log.info("Postgres on 127.0.0.1:%d (%s)", self.port, self.data_dir)
        return self

    def new_database(self, name: str) -> str:
        """Make the database ``name`` (letters, digits and ``_``); returns its URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: letters, digits and _ only")
        self._check([postgres_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                     "postgres", "-d", "postgres", "-tAc", f"CREATE DATABASE {name}"],
                    f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate`` is a crash: no checkpoint, WAL replay at start)."""
        if (self.data_dir / "postmaster.pid").exists():
            self._run([postgres_bin("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w",
                       "stop"])

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
