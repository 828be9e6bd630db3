"""The shared DuckDB file: who holds it, and what a waiter is told."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services.store import Store, holder


def test_a_busy_store_names_its_holder_and_the_cli_exits_cleanly(tmp_path: Path) -> None:
    """No traceback: the user learns which process holds the file, and the exit is non-zero."""
    store = Store(tmp_path / "t.duckdb", lock_timeout_s=0.5)
    with store.connect():
        assert holder(store.lock_path)["pid"] == os.getpid()  # type: ignore[index]
        env = {**os.environ, "TUNELOOP_HOME": str(tmp_path), "TUNELOOP_STORE__PATH":
               str(tmp_path / "t.duckdb"), "TUNELOOP_STORE__LOCK_TIMEOUT_S": "0.5"}
        done = subprocess.run([sys.executable, "-m", "tuneloop.cli.main", "adapters", "list"],
                              env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert f"pid {os.getpid()}" in message and "store busy" in message
