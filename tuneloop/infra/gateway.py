"""The embedded serving layer: the gateway process, which starts and supervises vLLM."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from tuneloop.infra.supervisor import read_state, state_path
from tuneloop.runtime.processes import ManagedProcess, log_tail, wait_until
from tuneloop.runtime.settings import Settings
from tuneloop.serving.vllm_process import managed_processes, vllm_python


class EmbeddedGateway:
    """``tuneloop gateway`` as a supervised background process, plus the vLLM replicas it
    started."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process = ManagedProcess("gateway", Path(settings.home))

    def start(self, env: dict[str, str], timeout_s: float | None = None) -> None:
        """Start the gateway and wait until a replica serves (vLLM takes ~40 s on 2 cores).

        Raises ``VLLMNotInstalledError`` (with the fix) before starting anything when vLLM
        is missing, ``TimeoutError`` naming the logs when no replica is ready in time, and
        ``OSError`` with the log's tail when the gateway exits at start.
        """
        vllm_python(self.settings.serving)  # fail now, with the fix, if vLLM is not installed
        # Supervised: a gateway that dies is restarted, adopts the running replicas and
        # rebuilds its routing from the registry.
        if self.process.pid() is None:
            state_path(Path(self.settings.home), "gateway").unlink(missing_ok=True)
        self.process.start([sys.executable, "-m", "tuneloop.cli.main", "supervise", "gateway"],
                           env=env)
        timeout = timeout_s or self.settings.serving.start_timeout_s
        try:
            wait_until(lambda: self.healthy() or self.process.pid() is None
                       or self._exited_at_start(), timeout, "gateway", interval_s=0.5)
        except TimeoutError:
            vllm_log = Path(self.settings.home) / "logs" / "vllm-0.log"
            raise TimeoutError(
                f"the gateway at {self.settings.serving.gateway_url} has no ready vLLM replica "
                f"after {timeout:.0f}s; see {self.process.log_file} and {vllm_log}. The "
                f"gateway's log ends:\n{self.process.tail()}\nvLLM's log ends:\n"
                f"{log_tail(vllm_log)}") from None
        if self.process.pid() is None or not self.healthy():
            self.process.stop()
            raise OSError(f"the gateway exited at start; its log says:\n{self.process.tail()}")

    def _exited_at_start(self) -> bool:
        """The supervisor had to restart the gateway before it ever served."""
        state = read_state(Path(self.settings.home), "gateway") or {}
        return int(state.get("restarts", 0)) > 0 and not self.healthy()

    def stop(self) -> list[str]:
        """Stop the gateway, then the replicas it started; returns the names stopped."""
        stopped = ["gateway"] if self.process.stop() else []
        for proc in managed_processes(self.settings):
            if proc.stop(timeout_s=20):
                stopped.append(proc.name)
        return stopped

    def healthy(self) -> bool:
        """Whether ``/health`` says a replica takes traffic."""
        try:
            url = f"{self.settings.serving.gateway_url}/health"
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False
