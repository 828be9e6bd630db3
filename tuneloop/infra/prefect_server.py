"""The embedded Prefect server (``prefect server start``), UI on localhost:4200, and
the flow runs it recorded."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from tuneloop.runtime.processes import ManagedProcess, wait_until
from tuneloop.runtime.settings import Settings


def prefect_env(settings: Settings) -> dict[str, str]:
    """Environment that points Prefect clients and the server at tuneloop's instance."""
    return {
        "PREFECT_API_URL": settings.prefect.api_url,
        "PREFECT_HOME": str((Path(settings.home) / "prefect").resolve()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
        # tuneloop's own log lines (training steps, curation counts) in each run's logs.
        "PREFECT_LOGGING_EXTRA_LOGGERS": "tuneloop",
        # The same code also logs outside a flow run (the CLI, the demo, the gateway): those
        # lines go to the console and the process's log only, without a warning each.
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        # The server's lease on a deployment's concurrency slot (canary/loop and retrain/loop
        # run one at a time) is taken when a run is submitted; the run renews it only once
        # its process is up. On a loaded machine that start (torch, transformers) has taken
        # longer than Prefect's 300 s, the lease was gone, and Prefect cancelled the run
        # ("Concurrency lease renewal failed", 410 Gone). An hour, Prefect's most.
        "PREFECT_SERVER_CONCURRENCY_INITIAL_DEPLOYMENT_LEASE_DURATION": "3600",
    }


class EmbeddedPrefect:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process = ManagedProcess("prefect", Path(settings.home))

    def start(self, timeout_s: float = 90.0) -> None:
        """Start the server unless one answers already. Raises ``TimeoutError`` (with the
        end of its log) when it is not healthy within ``timeout_s``."""
        if self.healthy():
            return
        port = str(self.settings.prefect.port)
        self.process.start(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
            env=prefect_env(self.settings),
        )
        try:
            wait_until(self.healthy, timeout_s, "Prefect server", interval_s=0.5)
        except TimeoutError:
            raise TimeoutError(
                f"Prefect server not healthy at {self.settings.prefect.api_url} after "
                f"{timeout_s:.0f}s; its log says:\n{self.process.tail()}"
            ) from None

    def stop(self) -> bool:
        """Stop the server tuneloop started; False when it was not running."""
        return self.process.stop()

    def healthy(self) -> bool:
        """Whether the Prefect API answers its health check."""
        try:
            return httpx.get(f"{self.settings.prefect.api_url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False


@dataclass(frozen=True)
class FlowRunLine:
    """One flow run as status lists it; ``error`` alone when Prefect could not be read."""

    name: str = ""
    state: str | None = None
    started: datetime | None = None
    seconds: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The line in ``tuneloop status --json``."""
        if self.error is not None:
            return {"error": self.error}
        return {"name": self.name, "state": self.state, "started": self.started,
                "seconds": self.seconds}


def recent_flow_runs(limit: int = 8) -> list[FlowRunLine]:
    """The latest flow runs on the Prefect API the environment names, newest first.

    Never raises: a server that cannot be reached gives one line with its ``error``.
    """
    # Imported here: Prefect reads its settings from the environment when imported, and
    # the CLI sets that environment (prefect_env) only once the settings are loaded.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(limit=limit, sort=FlowRunSort.START_TIME_DESC)
    except Exception as exc:  # noqa: BLE001 - status reports what it cannot reach
        return [FlowRunLine(error=f"{type(exc).__name__}: {exc}")]
    return [FlowRunLine(r.name, r.state_name, r.start_time,
                        r.total_run_time.total_seconds() if r.total_run_time else None)
            for r in runs]
