"""Keep a long-running component alive: restart it when it dies, with backoff.

``tuneloop up`` starts the supervisor as a managed process; the supervisor runs the
component as its child and restarts it after a crash (1 s, doubling to 60 s; the delay
resets once a child has run for a minute). SIGTERM stops the child, then the supervisor.
Restarts and the last exit are written to ``<home>/run/<name>-supervisor.json``.

With ``own_group`` the child runs in a process group of its own, and whatever is left of
that group when the child exits is killed before the restart: the deployment worker's
flow-run processes die with it, so a resubmitted run never trains beside a survivor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from tuneloop.runtime.files import write_json_atomic

log = logging.getLogger(__name__)

HEALTHY_AFTER_S = 60.0
MAX_BACKOFF_S = 60.0
STOP_S = 20.0  # on SIGTERM the child (and its group) gets this long, then SIGKILL


def state_path(home: Path, name: str) -> Path:
    """Where the supervisor of ``name`` writes its restarts and its child's pid."""
    return Path(home) / "run" / f"{name}-supervisor.json"


def read_state(home: Path, name: str) -> dict[str, Any] | None:
    """What the supervisor of ``name`` last wrote; None when it never ran here."""
    try:
        return dict(json.loads(state_path(home, name).read_text()))
    except (FileNotFoundError, ValueError):
        return None


def supervise(name: str, argv: Sequence[str], home: Path, own_group: bool = False) -> int:
    """Run ``argv`` until SIGTERM, restarting it whenever it exits; returns 0."""
    stopping = threading.Event()
    child: list[subprocess.Popen[bytes] | None] = [None]

    def on_term(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        if child[0] is not None and child[0].poll() is None:
            _terminate(child[0], own_group)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    state: dict[str, Any] = {"name": name, "restarts": 0, "last_exit": None,
                             "last_exit_at": None, "child_pid": None,
                             "since": datetime.now(UTC).isoformat()}
    backoff = 1.0
    while not stopping.is_set():
        started = time.monotonic()
        proc = subprocess.Popen(list(argv), start_new_session=own_group)
        child[0] = proc
        if stopping.is_set():  # a SIGTERM came between the start and the line above
            _terminate(proc, own_group)
        state["child_pid"] = proc.pid
        _save(home, name, state)
        code = proc.wait()
        if own_group:
            _kill_group(proc.pid)
        if stopping.is_set():
            break
        ran = time.monotonic() - started
        state.update(restarts=state["restarts"] + 1, last_exit=code,
                     last_exit_at=datetime.now(UTC).isoformat(), child_pid=None)
        _save(home, name, state)
        backoff = 1.0 if ran >= HEALTHY_AFTER_S else min(backoff * 2, MAX_BACKOFF_S)
        log.warning("%s exited with %s after %.0f s; restarting in %.0f s", name, code, ran,
                    backoff)
        stopping.wait(backoff)
    if child[0] is not None and child[0].poll() is None:
        try:
            child[0].wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            child[0].kill()
    if own_group and child[0] is not None:
        _kill_group(child[0].pid)
    state["child_pid"] = None
    _save(home, name, state)
    return 0


def _terminate(proc: subprocess.Popen[bytes], own_group: bool) -> None:
    """SIGTERM the child, and its whole group when it has one of its own."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if own_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _save(home: Path, name: str, state: dict[str, Any]) -> None:
    write_json_atomic(state_path(home, name), state)
