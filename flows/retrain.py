"""The ``retrain`` flow: a dataset version in, a candidate adapter in the registry out.

Wiring only; the work is in ``training.pipeline``. Idempotent by run key: the
flow run id unless one is given, so a rerun of the same flow run (or a retried
task) finds the adapter already published, or the finished run directory, and
does not train twice. Task caching is off: idempotency lives in the registry and
the run directory, which survive a crashed process, not in Prefect's result store.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from services.registry import Adapter
from services.settings import Settings, load_settings
from services.store import Store
from training.dataset import ChatExample, DatasetSplits
from training.pipeline import (
    TrainedRun,
    find_published,
    load_inputs,
    publish_run,
    recipe_config,
    train_candidate,
)

log = logging.getLogger(__name__)


def _store(settings: Settings) -> Store:
    return Store(settings.db_path, settings.store.lock_timeout_s)


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def find_adapter(settings: Settings, run_key: str) -> Adapter | None:
    return find_published(_store(settings), run_key)


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def read_inputs(
    settings: Settings, dataset_version: str
) -> tuple[DatasetSplits, list[ChatExample]]:
    return load_inputs(_store(settings), dataset_version)


# A retry resumes from the run's last checkpoint, so it costs the steps since then.
@task(retries=1, retry_delay_seconds=10, cache_policy=NONE)
def train(settings: Settings, splits: DatasetSplits, golden: list[ChatExample],
          overrides: dict[str, Any], config_file: str | None, run_key: str) -> TrainedRun:
    config = recipe_config(settings, Path(config_file) if config_file else None, **overrides)
    return train_candidate(settings, splits, golden, config, run_key, show_progress=False)


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def publish(settings: Settings, run: TrainedRun) -> Adapter:
    return publish_run(_store(settings), settings, run)


@flow(name="retrain", log_prints=False)
def retrain(
    dataset_version: str,
    config_file: str | None = None,
    max_steps: int | None = None,
    run_key: str | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Train a LoRA adapter on ``dataset_version`` and publish it as a candidate.

    Returns the adapter's version, name, state and metrics.
    """
    settings = settings or load_settings()
    key = run_key or f"flow-{flow_run.get_id()}"
    adapter = find_adapter(settings, key)
    if adapter is None:
        splits, golden = read_inputs(settings, dataset_version)
        run = train(settings, splits, golden, {"max_steps": max_steps}, config_file, key)
        adapter = publish(settings, run)
    else:
        log.info("retrain %s: adapter %s already published, not training again", key,
                 adapter.version)
    return {"version": adapter.version, "name": adapter.name, "state": adapter.state,
            "path": adapter.path, "run_key": key, "metrics": adapter.metrics}
