"""The loop as separate machines run it, on this one: ``tuneloop up --split``.

Every role has a home of its own, and no two roles have a path in common: they meet only
through Kafka, Postgres, the object store and HTTP, as on a cluster. Under the home
``H`` that runs the command (the operator's, and the app's):

    H/services/postgres      the store (this machine's PostgreSQL, on loopback)
    H/services/object-store  adapters, checkpoints, reports, dataset snapshots (SeaweedFS)
    H/services/broker        Kafka (tansu)
    H/services/prefect       the Prefect server
    H/roles/control          the control worker: the loop's flows (tuneloop worker)
    H/roles/train            the training worker: `prefect worker` on the training pool
    H/roles/ingest-1, -2     two ingest workers in one consumer group
    H/roles/gateway          the gateway and its vLLM replicas, each with its own cache

Each role gets its own copy of the settings file (``<role>/tuneloop.toml``), its own
caches (``XDG_CACHE_HOME``: the converted base model, the embedding model), its own
Prefect home and temporary directory. The settings that make the split
(:func:`split_settings`) put the store in Postgres, adapters, runs and dataset versions
in the object store, training on the ``train`` work pool and two vLLM replicas behind
the gateway.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tuneloop.infra.broker import EmbeddedBroker
from tuneloop.infra.object_store import EmbeddedObjectStore
from tuneloop.infra.postgres import DATABASE, LocalPostgres
from tuneloop.infra.prefect_server import EmbeddedPrefect, prefect_env
from tuneloop.infra.stack import Health
from tuneloop.runtime.processes import ManagedProcess, free_port, port_open, wait_until
from tuneloop.runtime.settings import CONFIG_ENV, Settings, load_settings
from tuneloop.services.demo.scenario import merge, to_toml

log = logging.getLogger(__name__)

TRAIN_POOL = "train"
INGEST_ROLES = ("ingest-1", "ingest-2")
ROLES = ("control", "train", *INGEST_ROLES, "gateway")
SERVICES = ("postgres", "object-store", "broker", "prefect")


def split_settings(home: Path) -> dict[str, Any]:
    """The settings (as a TOML table) that split the loop into roles, on free ports."""
    return {
        "store": {"url": f"postgresql://postgres@127.0.0.1:{free_port()}/{DATABASE}",
                  "snapshots": True, "artifacts": True},
        "object_store": {"endpoint": f"http://127.0.0.1:{free_port()}",
                         "data_dir": str(home / "services" / "object-store")},
        "kafka": {"bootstrap_servers": f"127.0.0.1:{free_port()}"},
        "prefect": {"port": (port := free_port()), "api_url": f"http://127.0.0.1:{port}/api"},
        "loop": {"train_work_pool": TRAIN_POOL},
        # Two replicas on consecutive ports from vllm_port; keys every role's copy holds,
        # as a cluster's Secrets would give them. The event key above all: the gateway
        # signs the verdicts it takes with it and the control worker's canary counts only
        # those it can check, so a key of each role's own leaves every live window empty.
        "serving": {"replicas": 2, "gateway_port": free_port(), "vllm_port": _two_ports(),
                    "vllm_api_key": secrets.token_urlsafe(24),
                    "admin_key": secrets.token_urlsafe(24),
                    "event_key": secrets.token_urlsafe(32),
                    "user_id_key": secrets.token_urlsafe(32)},
    }


def _two_ports() -> int:
    """A free port whose next one is free too."""
    while True:
        port = free_port()
        if port < 65535 and not port_open("127.0.0.1", port + 1):
            return port


class Split:
    """Start, stop and find the services and roles of a split home."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = Path(settings.home).resolve()

    def service_home(self, name: str) -> Path:
        return self.home / "services" / name

    def role_home(self, name: str) -> Path:
        return self.home / "roles" / name

    def _at(self, home: Path) -> Settings:
        """These settings (the operator's file and environment), with ``home`` as the home."""
        return load_settings({"home": home})

    # ------------------------------------------------------------------ services
    def start_services(self) -> None:
        """Postgres, the object store, the broker and the Prefect server, each in a folder
        of its own."""
        url = urlsplit(self.settings.store.url.get_secret_value()) if self.settings.store.url \
            else None
        if url is None or url.port is None:
            raise ValueError("a split home keeps its store in Postgres: store.url with a "
                             "port (see tuneloop.infra.split.split_settings)")
        pg_home = self.service_home("postgres")
        pg_home.mkdir(parents=True, exist_ok=True)
        pg_home.chmod(0o755)  # the postgres user owns the cluster when tuneloop runs as root
        LocalPostgres(pg_home / "data", port=url.port).start()  # makes the database
        EmbeddedObjectStore(self._at(self.service_home("object-store"))).start()
        EmbeddedBroker(self._at(self.service_home("broker"))).start()
        EmbeddedPrefect(self._at(self.service_home("prefect"))).start(timeout_s=180)

    def stop_services(self) -> list[str]:
        stopped = []
        if EmbeddedPrefect(self._at(self.service_home("prefect"))).stop():
            stopped.append("prefect")
        if EmbeddedBroker(self._at(self.service_home("broker"))).stop():
            stopped.append("broker")
        if EmbeddedObjectStore(self._at(self.service_home("object-store"))).stop():
            stopped.append("object-store")
        data = self.service_home("postgres") / "data"
        if (data / "postmaster.pid").exists():
            LocalPostgres(data).stop()
            stopped.append("postgres")
        return stopped

    # ------------------------------------------------------------------ roles
    def role_env(self, role: str) -> dict[str, str]:
        """The environment of a role's processes: its home, its own copy of the settings
        file, caches, Prefect home and temporary directory."""
        home = self.role_home(role)
        for sub in ("cache", "tmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        config = home / "tuneloop.toml"
        # It holds the keys (the gateway's admin key, vLLM's) as a cluster's Secret would.
        config.touch(mode=0o600)
        config.chmod(0o600)
        config.write_text(to_toml(self._role_table(role)))
        settings = load_settings({"home": home})
        return {**prefect_env(settings),
                "TUNELOOP_HOME": str(home), CONFIG_ENV: str(config),
                "XDG_CACHE_HOME": str(home / "cache"), "TMPDIR": str(home / "tmp"),
                "HF_HOME": str(home / "cache" / "huggingface")}

    def _role_table(self, role: str) -> dict[str, Any]:
        """The operator's settings file, copied; a recipe file it names under the
        operator's home is copied into the role's home too, and a task's schema file is
        named by its absolute path (each role runs in its own home)."""
        config = os.environ.get(CONFIG_ENV)
        table: dict[str, Any] = {}
        if config is not None and Path(config).exists():
            table = tomllib.loads(Path(config).read_text())
        for alias, spec in load_settings({"home": self.home}).tasks.items():
            if spec.json_schema is not None:
                table = merge(table, {"tasks": {alias: {
                    "json_schema": str(spec.json_schema.resolve())}}})
        recipe = (table.get("training") or {}).get("config")
        if recipe and Path(recipe).resolve().is_relative_to(self.home):
            copy = self.role_home(role) / Path(recipe).name
            shutil.copyfile(recipe, copy)
            table = merge(table, {"training": {"config": str(copy)}})
        return table

    def start_roles(self) -> None:
        """Every role, each under a supervisor in its home (the control worker registers
        the training deployment on the pool); waits until the gateway serves."""
        for role in ROLES:
            self.role_home(role).mkdir(parents=True, exist_ok=True)
        self._pool()
        for role in INGEST_ROLES:
            self._start(role, ["supervise", "ingest"])
        self._start("control", ["supervise", "worker"])
        self.start_train_worker("train")
        gateway = self._start("gateway", ["supervise", "gateway"])
        gateway_settings = load_settings({"home": self.role_home("gateway")})
        url = f"{gateway_settings.serving.gateway_url}/health"

        def serving() -> bool:
            import httpx

            try:
                return httpx.get(url, timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(lambda: serving() or gateway.pid() is None,
                   self.settings.serving.start_timeout_s, "gateway", interval_s=1.0)
        if not serving():
            log_file = self.role_home("gateway") / "logs"
            raise RuntimeError(f"the gateway role exited before it served; see {log_file}")

    def start_train_worker(self, role: str) -> ManagedProcess:
        """A training worker in the role home ``role`` (a new name: a replacement machine)."""
        self.role_home(role).mkdir(parents=True, exist_ok=True)
        process = ManagedProcess("train-worker", self.role_home(role))
        env = self.role_env(role)
        process.start([str(Path(sys.executable).with_name("prefect")), "worker", "start",
                       "--pool", TRAIN_POOL, "--type", "process", "--limit", "1"],
                      env=env, cwd=self.role_home(role))
        return process

    def _pool(self) -> None:
        """The training work pool (a process pool, concurrency 1: one trainer at a time)."""
        env = {**os.environ, **prefect_env(self.settings)}
        prefect = str(Path(sys.executable).with_name("prefect"))
        for args in (["work-pool", "create", TRAIN_POOL, "--type", "process", "--overwrite"],
                     ["work-pool", "set-concurrency-limit", TRAIN_POOL, "1"]):
            try:
                subprocess.run([prefect, *args], env=env, check=True, capture_output=True,
                               text=True, timeout=120)
            except subprocess.CalledProcessError as exc:
                raise RuntimeError(f"`prefect {' '.join(args)}` failed: "
                                   f"{(exc.stderr or exc.stdout or '').strip()[-500:]}") from exc
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"`prefect {' '.join(args)}` took over 120 s") from exc

    def _start(self, role: str, args: list[str]) -> ManagedProcess:
        process = ManagedProcess(role, self.role_home(role))
        process.start([sys.executable, "-m", "tuneloop.cli.main", *args],
                      env=self.role_env(role), cwd=self.role_home(role))
        return process

    def role_processes(self) -> dict[str, ManagedProcess]:
        """The managed process of every role started here, by role home (the training
        workers' replacements among them)."""
        found: dict[str, ManagedProcess] = {}
        roles = self.home / "roles"
        for home in sorted(roles.iterdir()) if roles.is_dir() else []:
            name = "train-worker" if (home / "run" / "train-worker.pid").exists() else home.name
            found[home.name] = ManagedProcess(name, home)
        return found

    def stop_roles(self) -> list[str]:
        """Stop every role, then whatever their processes started in sessions of their
        own (Prefect's flow runs) and anything else of their homes."""
        from tuneloop.runtime.processes import descendants, end_processes, processes_of_home
        from tuneloop.serving.vllm_process import managed_processes

        roles = self.role_processes()
        below = [p for proc in roles.values() if (pid := proc.pid()) is not None
                 for p in descendants(pid)]
        stopped = []
        for role, process in roles.items():
            if process.stop(timeout_s=30):
                stopped.append(role)
        for replica in managed_processes(load_settings({"home": self.role_home("gateway")})):
            if replica.stop(timeout_s=20):
                stopped.append(f"gateway/{replica.name}")
        left = end_processes([*below, *(p for role in roles
                                        for p in processes_of_home(self.role_home(role)))])
        if left:
            stopped.append(f"{left} leftover process(es)")
        return stopped

    def health(self) -> list[Health]:
        """The services, then each role: whether it runs (and for the gateway, serves)."""
        from tuneloop.infra.supervisor import read_state
        from tuneloop.runtime.processes import port_open

        url = urlsplit(self.settings.store.url.get_secret_value()) if self.settings.store.url \
            else None
        out = [
            Health("postgres", url is not None and port_open(url.hostname or "127.0.0.1",
                                                             url.port or 5432),
                   f"{url.hostname}:{url.port} ({self.service_home('postgres')})" if url
                   else "store.url is not set"),
            Health("object-store", EmbeddedObjectStore(self.settings).healthy(),
                   self.settings.object_store.endpoint),
            Health("kafka", EmbeddedBroker(self.settings).healthy(),
                   self.settings.kafka.bootstrap_servers),
            Health("prefect", EmbeddedPrefect(self.settings).healthy(),
                   self.settings.prefect.api_url.removesuffix("/api")),
        ]
        for role, process in self.role_processes().items():
            home = self.role_home(role)
            supervised = {"control": "worker", "gateway": "gateway"}.get(
                role, "ingest" if role.startswith("ingest") else None)
            state = (read_state(home, supervised) if supervised else None) or {}
            detail = f"pid {process.pid()}, home {home}" if process.pid() else f"home {home}"
            if state.get("restarts"):
                detail += f", {state['restarts']} restart(s), last exit {state.get('last_exit')}"
            ok = process.pid() is not None
            if role == "gateway":
                from tuneloop.infra.gateway import EmbeddedGateway

                gateway = load_settings({"home": home})
                ok = ok and EmbeddedGateway(gateway).healthy()
                detail = f"{gateway.serving.gateway_url} ({gateway.serving.replicas} vLLM " \
                         f"replicas), {detail}"
            out.append(Health(role, ok, detail))
        return out

    def up(self) -> None:
        self.start_services()
        from tuneloop.services.feedback.topics import ensure_topics

        ensure_topics(self.settings.kafka, extra=(self.settings.serving.shadow_topic,))
        self.start_roles()

    def down(self) -> list[str]:
        return self.stop_roles() + self.stop_services()


def is_split(home: Path | str) -> bool:
    """Whether ``home`` runs the split topology (``tuneloop up --split``)."""
    return (Path(home) / "roles").is_dir() or (Path(home) / "services").is_dir()
