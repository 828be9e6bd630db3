"""A tuneloop command that runs its own embedded stack in a test: its environment, and
the end-to-end demo run in the background."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
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


@dataclass
class DemoRun:
    """``tuneloop demo --down`` (the default scenario) running in a process of its own, with
    its own stack in ``directory / "home"``; stdout and stderr go to files beside it."""

    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def home(self) -> Path:
        return self.directory / "home"

    def wait(self, timeout_s: float) -> tuple[int, str, str]:
        """The command's exit status, stdout and stderr, once it ended; a run past
        ``timeout_s`` is stopped as an operator would (Ctrl-C: the demo takes its stack
        down) and counts as failed."""
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            code = -1
        return (code, (self.directory / "stdout").read_text(),
                (self.directory / "stderr").read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_demo(directory: Path) -> DemoRun:
    """Start ``tuneloop demo --down`` on a stack of its own: its home, free ports, none of
    the test session's serving settings, and the default broker storage (its log in the
    stack's own object store)."""
    directory.mkdir(parents=True, exist_ok=True)
    env = own_stack_env(directory / "home", TUNELOOP_SERVING__GATEWAY_PORT=str(free_port()),
                        TUNELOOP_SERVING__VLLM_PORT=str(free_port()), COLUMNS="140",
                        TUNELOOP_OBJECT_STORE__ENDPOINT=f"http://127.0.0.1:{free_port()}")
    env.pop("TUNELOOP_CONFIG", None)
    env.pop("TUNELOOP_KAFKA__STORAGE_ENGINE", None)  # the default: the log in the object store
    for key in [k for k in env if k.startswith("TUNELOOP_SERVING__") and k not in (
            "TUNELOOP_SERVING__GATEWAY_PORT", "TUNELOOP_SERVING__VLLM_PORT")]:
        env.pop(key)  # the session's shared gateway settings are not this stack's
    with (directory / "stdout").open("wb") as out, (directory / "stderr").open("wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "tuneloop.cli.main", "demo", "--down"],
                                   env=env, stdout=out, stderr=err)
    return DemoRun(directory, process)
