"""The environment of a tuneloop command that runs its own embedded stack in a test."""

from __future__ import annotations

import os
from pathlib import Path

from tuneloop.runtime.processes import free_port


def own_stack_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment with a home of its own and free broker and Prefect ports."""
    prefect_port = free_port()
    return {
        **os.environ,
        "TUNELOOP_HOME": str(home),
        "TUNELOOP_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "TUNELOOP_PREFECT__PORT": str(prefect_port),
        "TUNELOOP_PREFECT__API_URL": f"http://127.0.0.1:{prefect_port}/api",
        **extra,
    }
