"""The embedded Prefect server (``prefect server start``), UI on localhost:4200."""

from __future__ import annotations

import sys
from pathlib import Path

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
    }


class EmbeddedPrefect:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process = ManagedProcess("prefect", Path(settings.home))

    def start(self, timeout_s: float = 90.0) -> None:
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
        return self.process.stop()

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.settings.prefect.api_url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False
