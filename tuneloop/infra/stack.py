"""The embedded stack as one unit: broker (and the object store it keeps its log in,
when kafka.storage_engine is an s3:// URL), Prefect server, deployment worker, the
long-running ingest (under its supervisor) and the gateway with vLLM."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from tuneloop.infra.broker import EmbeddedBroker
from tuneloop.infra.gateway import EmbeddedGateway
from tuneloop.infra.object_store import EmbeddedObjectStore, uses_object_store
from tuneloop.infra.prefect_server import EmbeddedPrefect, prefect_env
from tuneloop.infra.supervisor import STOP_S as SUPERVISOR_STOP_S
from tuneloop.runtime.processes import ManagedProcess
from tuneloop.runtime.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Health:
    """One component: whether it answers, and where it runs."""

    component: str
    ok: bool
    detail: str


class Stack:
    """The embedded components of one tuneloop home, started, stopped and probed together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.object_store = EmbeddedObjectStore(settings)
        self.broker = EmbeddedBroker(settings)
        self.prefect = EmbeddedPrefect(settings)
        self.worker = ManagedProcess("worker", Path(settings.home))
        self.ingest = ManagedProcess("ingest", Path(settings.home))
        self.gateway = EmbeddedGateway(settings)

    def up(self, worker: bool = True, serving: bool = True, ingest: bool = True) -> None:
        """Start what the settings say is embedded, then the worker and the gateway; idempotent."""
        if self._runs_object_store():
            self.object_store.start()
        if self.settings.kafka.embedded:
            self.broker.start()
        if self.settings.prefect.embedded:
            self.prefect.start()
        from tuneloop.services.feedback.topics import ensure_topics

        ensure_topics(self.settings.kafka, extra=(self.settings.serving.shadow_topic,))
        self._repair_registry()
        env = {**prefect_env(self.settings), **self._tuneloop_env()}
        if ingest:
            self.ingest.start([sys.executable, "-m", "tuneloop.cli.main", "supervise", "ingest"],
                              env=env)
        if worker:
            if self.worker.pid() is None:
                from tuneloop.infra.supervisor import state_path

                state_path(Path(self.settings.home), "worker").unlink(missing_ok=True)
            self.worker.start([sys.executable, "-m", "tuneloop.cli.main", "supervise", "worker"],
                              env=env)
        if serving and self.settings.serving.embedded:
            self.gateway.start(env)

    def _repair_registry(self) -> None:
        """Finish or undo an adapter publish a crash cut short
        (see ``tuneloop.services.registry.store.repair``)."""
        from tuneloop.services.registry.remote import RemoteAdapters
        from tuneloop.services.registry.store import repair
        from tuneloop.services.store.database import Store

        remote = RemoteAdapters.of(self.settings) if self.settings.store.artifacts else None
        if Path(self.settings.adapters_dir).is_dir() or remote is not None:
            with Store.of(self.settings).connect() as con:
                repair(con, Path(self.settings.adapters_dir), remote)

    def down(self) -> list[str]:
        """Stop every component tuneloop started here, and every process they started
        (a flow run training in a session of its own among them); returns the names of
        those stopped. Ends with no process of this home left."""
        from tuneloop.runtime.processes import descendants, end_processes, processes_of_home

        home = Path(self.settings.home)
        # Taken first: once a parent is gone its children are no longer found below it.
        below = [p for proc in (self.worker, self.ingest, self.gateway.process)
                 if (pid := proc.pid()) is not None for p in descendants(pid)]
        stopped = self.gateway.stop()
        # The worker's supervisor gives a flow run SUPERVISOR_STOP_S to end, then kills it.
        for name, proc, wait_s in (("ingest", self.ingest, 15.0),
                                   ("worker", self.worker, SUPERVISOR_STOP_S + 10),
                                   ("prefect", self.prefect.process, 15.0),
                                   ("broker", self.broker.process, 15.0),
                                   # After the broker, which writes to it to the end.
                                   ("object-store", self.object_store.process, 15.0)):
            if proc.stop(timeout_s=wait_s):
                stopped.append(name)
        left = end_processes([*below, *processes_of_home(home)])
        if left:
            log.warning("down: %d process(es) of %s outlived their component; ended", left, home)
            stopped.append(f"{left} leftover process(es)")
        return stopped

    def health(self) -> list[Health]:
        """Each component's health, in the order status shows them."""
        kafka = self.settings.kafka
        where = "embedded tansu" if kafka.embedded else "external"
        if kafka.embedded and kafka.storage_bucket is not None:
            where += f", log in {kafka.storage_engine}"
        store = ([Health("object-store", self.object_store.healthy(),
                         f"{self.settings.object_store.endpoint} "
                         f"({'embedded SeaweedFS' if self.settings.object_store.embedded else 'external'})")]
                 if uses_object_store(self.settings) else [])
        return [
            Health("kafka", self.broker.healthy(), f"{kafka.bootstrap_servers} ({where})"),
            *store,
            Health("prefect", self.prefect.healthy(),
                   self.settings.prefect.api_url.removesuffix("/api")),
            self._worker_health(),
            self._ingest_health(),
            self._gateway_health(),
        ]

    def _runs_object_store(self) -> bool:
        """Whether ``up`` starts the object store: it is embedded and something uses it."""
        return self.settings.object_store.embedded and uses_object_store(self.settings)

    def _worker_health(self) -> Health:
        from tuneloop.infra.supervisor import read_state

        if self.worker.pid() is None:
            return Health("worker", False, "not running (tuneloop up starts it)")
        state = read_state(Path(self.settings.home), "worker") or {}
        child = state.get("child_pid")
        detail = f"pid {child} (Prefect deployments)" if child else "worker restarting"
        if state.get("restarts"):
            detail += (f", {state['restarts']} restart(s), last exit {state.get('last_exit')}; "
                       "interrupted runs resumed")
        return Health("worker", child is not None, detail)

    def _gateway_health(self) -> Health:
        from tuneloop.infra.supervisor import read_state

        detail = (f"{self.settings.serving.gateway_url} (OpenAI-compatible; "
                  f"{self.settings.serving.replicas} vLLM replica(s))")
        state = read_state(Path(self.settings.home), "gateway") or {}
        if state.get("restarts"):
            detail += (f", {state['restarts']} gateway restart(s), last exit "
                       f"{state.get('last_exit')}")
        return Health("gateway", self.gateway.healthy(), detail)

    def _ingest_health(self) -> Health:
        from tuneloop.infra.supervisor import read_state
        from tuneloop.services.ingest.service import read_status

        pid = self.ingest.pid()
        if pid is None:
            return Health("ingest", False, "not running (tuneloop up starts it)")
        state = read_state(Path(self.settings.home), "ingest") or {}
        status = read_status(Path(self.settings.home)) or {}
        child = state.get("child_pid")
        detail = f"consumer pid {child}" if child else "consumer restarting"
        if state.get("restarts"):
            detail += f", {state['restarts']} restart(s), last exit {state.get('last_exit')}"
        if status.get("updated_at"):
            detail += f", {status.get('events_per_min', 0):,.0f} events/min"
        return Health("ingest", child is not None, detail)

    def _tuneloop_env(self) -> dict[str, str]:
        """Carry the effective settings into the worker, whatever file/flags produced them."""
        s = self.settings
        return {
            "TUNELOOP_HOME": str(Path(s.home).resolve()),
            "TUNELOOP_KAFKA__BOOTSTRAP_SERVERS": s.kafka.bootstrap_servers,
            "TUNELOOP_KAFKA__GROUP_ID": s.kafka.group_id,
            "TUNELOOP_KAFKA__TOPIC": s.kafka.topic,
            "TUNELOOP_KAFKA__DLQ_TOPIC": s.kafka.dlq_topic,
            "TUNELOOP_PREFECT__API_URL": s.prefect.api_url,
            "TUNELOOP_STORE__PATH": str(s.db_path.resolve()),
            "TUNELOOP_SERVING__GATEWAY_PORT": str(s.serving.gateway_port),
            "TUNELOOP_SERVING__VLLM_PORT": str(s.serving.vllm_port),
            "TUNELOOP_SERVING__REPLICAS": str(s.serving.replicas),
        }
