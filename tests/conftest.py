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

import pytest

from infra.processes import free_port

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
# A developer's own config file must not leak into the tests.
os.environ["TUNELOOP_CONFIG"] = str(_SESSION_HOME / "no-such-config.toml")

from services.settings import Settings, load_settings  # noqa: E402
from services.store import Store  # noqa: E402


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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def session_settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def broker(session_settings: Settings) -> Iterator[Settings]:
    """A real tansu broker for the whole session; yields the settings that reach it."""
    from infra.broker import EmbeddedBroker

    b = EmbeddedBroker(session_settings)
    b.start()
    yield session_settings
    b.stop()


@pytest.fixture(scope="session")
def prefect_server(session_settings: Settings) -> Iterator[str]:
    """A real Prefect server for the whole session; yields its API URL."""
    from infra.prefect_server import EmbeddedPrefect

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
    return Store(settings.db_path, settings.store.lock_timeout_s)
