"""The ``retrain`` flow: feedback in, a candidate adapter in the registry out, then the canary.

Wiring only; the work is in the stages: the retrain guard
(``tuneloop.services.loop``), curation (``tuneloop.services.curation.run``) and training
(``tuneloop.training.pipeline``).

1. What started it: a drift alarm (``tuneloop.drift.detected``), enough new labels
   (``tuneloop.labels.accumulated``), the schedule, or a person (``tuneloop retrain``).
   An automatic retrain is skipped, with the reason recorded, while a canary is live
   or a held candidate waits for its next offline look, within ``loop.cooldown_s`` of
   the last one, or while a label production never learned has fewer than
   ``loop.min_examples_per_new_label`` examples (for at most ``loop.new_label_wait_s``):
   the rules are ``tuneloop.services.loop.policy``. The deployment runs one at a time.
2. Curate a dataset version (unless one is given), replaying every label production knows.
3. Train: from the production adapter's weights (``loop.continue_from_production``), in
   the worker or on ``loop.train_work_pool``; publish as a candidate.
4. Emit ``tuneloop.adapter.published``: the canary deployment's trigger takes it from there.

Idempotent by run key (the triggering event's id, else the flow run's): a rerun finds
the dataset version curated under the key, the finished run directory and the
published adapter, and does none of it twice. Task caching is off: idempotency lives in
the store and the run directory, which survive a crashed process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.events import emit_event
from prefect.runtime import flow_run

from tuneloop.flows.common import curation_markdown, flow_settings, image_markdown, rename_run
from tuneloop.flows.drift import DRIFT_EVENT
from tuneloop.flows.recovery import RESUMED_TAG
from tuneloop.runtime.cpu import pinned
from tuneloop.runtime.settings import (
    CurationSettings,
    EmbeddingSettings,
    LoopSettings,
    Settings,
    TaskSpec,
)
from tuneloop.services.canary import records
from tuneloop.services.canary.core import INFO, Check, Decision
from tuneloop.services.curation.core import NothingNew
from tuneloop.services.curation.run import run_curation
from tuneloop.services.curation.store import CurationRun, Learned, find_curated
from tuneloop.services.drift.embeddings import Embedder
from tuneloop.services.loop import metrics as loop_metrics
from tuneloop.services.loop.policy import why_not_retrain
from tuneloop.services.loop.store import read_snapshot
from tuneloop.services.registry.core import Adapter
from tuneloop.services.registry.store import list_adapters, production
from tuneloop.services.store.database import AnyStore, Store
from tuneloop.training.dataset import ChatExample, DatasetSplits
from tuneloop.training.pipeline import (
    TrainedRun,
    UnchangedAdapter,
    Workspace,
    find_published,
    init_adapter_dir,
    load_inputs,
    production_version,
    publish_run,
    read_finished_run,
    recipe_config,
    train_candidate,
    unchanged_reason,
)

log = logging.getLogger(__name__)
# A training run on the work pool that crashed (its machine died) is submitted again this
# many times; its run key makes it go on from its last checkpoint.
POOL_RESUBMITS = 2

PUBLISHED_EVENT = "tuneloop.adapter.published"
RETRIABLE = (TimeoutError, ConnectionError, OSError)



def _retry_if_retriable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O hiccups (a busy store, a dropped connection); a bad input fails at once."""
    try:
        state.result()
    except RETRIABLE:
        return True
    except Exception as exc:  # noqa: BLE001 - the predicate only classifies
        return bool(getattr(exc, "retriable", False))
    return False


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_if_retriable,
      cache_policy=NONE)
def find_adapter(store: AnyStore, run_key: str) -> Adapter | None:
    return find_published(store, run_key)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_if_retriable,
      cache_policy=NONE)
def why_not(store: AnyStore, alias: str, loop: LoopSettings, run_key: str,
            drift_triggered: bool) -> str | None:
    """Why an automatic retrain should not start now, or None (the loop's policy)."""
    return why_not_retrain(read_snapshot(store, alias, run_key, drift_triggered),
                           datetime.now(UTC), loop)


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_if_retriable,
      cache_policy=NONE)
def curate(store: AnyStore, embeddings: EmbeddingSettings, curation: CurationSettings,
           cpu_cores: str | None, run_key: str, task: TaskSpec,
           continue_from: str | None) -> CurationRun:
    """The retrain's dataset version. When it continues from the production adapter of
    the alias ``continue_from``, the version is curated against what that adapter
    learned and what the alias's rejected adapters learned
    (:class:`~tuneloop.services.curation.store.Learned`)."""
    found = find_curated(store, run_key)
    if found is not None:
        log.info("retrain %s: dataset %s already curated", run_key, found.version)
        return found
    learned = None
    if continue_from is not None:
        with store.connect() as con:
            adapter = production(con, continue_from)
            rejected = frozenset(a.dataset_version for a in list_adapters(con, continue_from)
                                 if a.state == "rejected" and a.dataset_version)
        learned = Learned(adapter.dataset_version if adapter else None, rejected)
    with pinned(cpu_cores):
        return run_curation(store, Embedder(embeddings), curation, run_key=run_key, task=task,
                            learned=learned)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_if_retriable,
      cache_policy=NONE)
def read_inputs(store: AnyStore, dataset_version: str, continue_from: str | None,
                ) -> tuple[DatasetSplits, list[ChatExample], str | None]:
    """The dataset, the golden set, and the production version of the alias
    ``continue_from`` to continue from (None: from zeros)."""
    splits, golden = load_inputs(store, dataset_version)
    init = production_version(store, continue_from) if continue_from else None
    return splits, golden, init


# A retry resumes from the run's last checkpoint, so it costs the steps since then.
@task(retries=1, retry_delay_seconds=10, cache_policy=NONE)
def train(workspace: Workspace, splits: DatasetSplits, golden: list[ChatExample],
          recipe_overrides: dict[str, Any], config_file: str | None, run_key: str,
          init_adapter: str | None, show_progress: bool) -> TrainedRun:
    config = recipe_config(workspace.training, Path(config_file) if config_file else None,
                           **recipe_overrides)
    return train_candidate(workspace, splits, golden, config, run_key,
                           show_progress=show_progress,
                           init_adapter=Path(init_adapter) if init_adapter else None)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_if_retriable,
      cache_policy=NONE)
def publish(store: AnyStore, workspace: Workspace, run: TrainedRun) -> Adapter:
    return publish_run(store, workspace, run)


@flow(name="train-adapter", log_prints=False)
def train_adapter(dataset_version: str, run_key: str, init_adapter: str | None = None,
                  config_file: str | None = None,
                  recipe_overrides: dict[str, Any] | None = None,
                  show_progress: bool = False, overrides: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Train and publish one adapter (``tuneloop train``; what runs on
    ``loop.train_work_pool`` when one is set). ``init_adapter`` is where the weights start:
    an adapter version (``v7``), fetched and verified by the machine that trains, or a
    directory on it. ``recipe_overrides`` are recipe fields; ``overrides`` settings by
    dotted name (a secret is refused)."""
    settings = flow_settings(overrides)
    store, workspace = Store.of(settings), Workspace.of(settings)
    adapter = find_adapter(store, run_key)
    run: TrainedRun | None = None
    if adapter is None:
        splits, golden, _ = read_inputs(store, dataset_version, None)
        init = init_adapter_dir(store, workspace, init_adapter)
        run = train(workspace, splits, golden, recipe_overrides or {}, config_file, run_key,
                    str(init) if init else None, show_progress)
        if (unchanged := unchanged_reason(run)) is not None:
            # Production itself as a candidate: the canary would hold it for ever. Said in
            # the result, not raised: on a training pool this run completes, and the
            # retrain that waits on it reads why it published nothing.
            log.warning("run %s: %s", run_key, unchanged)
            return {"version": None, "unchanged": unchanged, "run_dir": run.run_dir,
                    "train_s": run.timings.get("train_s")}
        adapter = publish(store, workspace, run)
    return {"version": adapter.version, "name": adapter.name, "state": adapter.state,
            "path": adapter.where(settings.adapters_dir), "metrics": adapter.metrics,
            "run_dir": run.run_dir if run else None,
            "train_s": (run.timings.get("train_s") if run else None)}


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def record(store: AnyStore, home: Path, decision: Decision) -> str:
    decision_id = records.record(store, home, decision, str(flow_run.get_id() or "") or None
                                 ).decision_id
    if "seconds" in decision.figures:
        loop_metrics.record(home, "retrain", seconds=decision.figures["seconds"],
                            version=decision.candidate)
    return decision_id


def _training_markdown(adapter: dict[str, Any], run_dir: str | None) -> str:
    metrics = adapter.get("metrics") or {}
    training = metrics.get("training") or {}
    lines = [f"## adapter {adapter['name']}", "", "| metric | value |", "|---|---|"]
    for key in ("initial_val_loss", "best_val_loss", "steps", "tokens_per_s"):
        if key in training:
            value = training[key]
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float)
                         else f"| {key} | {value} |")
    for name in ("base_golden", "golden", "validation"):
        report = metrics.get(name) or {}
        if report.get("macro_f1") is not None:
            lines.append(f"| {name} accuracy / macro-F1 | {report['accuracy']:.3f} / "
                         f"{report['macro_f1']:.3f} |")
    curve = Path(run_dir) / "training_curve.png" if run_dir else None
    return "\n".join(lines) + image_markdown(curve, "training curve")


def _run_name() -> str:
    params = flow_run.get_parameters() or {}
    resumed = ", resumed" if RESUMED_TAG in (flow_run.get_tags() or []) else ""
    return f"retrain ({params.get('reason') or 'manual'}{resumed})"


@flow(name="retrain", flow_run_name=_run_name, log_prints=False)
def retrain(
    reason: str = "manual",
    trigger_id: str | None = None,
    automatic: bool = False,
    dataset_version: str | None = None,
    config_file: str | None = None,
    max_steps: int | None = None,
    run_key: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Curate (unless ``dataset_version`` is given), train, publish a candidate, hand it to
    the canary. An automatic retrain (``automatic``, or ``trigger_id``: the event that
    started it, which is then its run key) is skipped while the loop's policy says wait.
    ``overrides`` are settings by dotted name (a secret is refused)."""
    settings = flow_settings(overrides)
    store = Store.of(settings)
    automatic = automatic or trigger_id is not None
    key = run_key or (f"event-{trigger_id}" if automatic else f"flow-{flow_run.get_id()}")
    trigger = Check("trigger", INFO, None, None, "", reason)
    adapter = find_adapter(store, key)
    if adapter is None and automatic:
        blocked = why_not(store, settings.serving.alias, settings.loop, key,
                          reason == DRIFT_EVENT)
        if blocked:
            record(store, settings.home, Decision(
                "retrain", None, None, "skipped",
                [trigger, Check("skipped", INFO, None, None, "", blocked)], {"run_key": key}))
            rename_run(f"retrain skipped: {blocked}"[:100])
            return {"verdict": "skipped", "reason": blocked, "run_key": key}
    if adapter is None:
        try:
            trained = _curate_and_train(settings, overrides, store, trigger, key,
                                        dataset_version, config_file, max_steps)
        except (NothingNew, UnchangedAdapter) as exc:
            if not automatic:
                raise  # a person asked: the CLI says why
            rename_run(f"retrain skipped: {exc}"[:100])
            return {"verdict": "skipped", "reason": str(exc), "run_key": key}
    else:
        log.info("retrain %s: adapter %s already published, not training again", key,
                 adapter.version)
        trained = {"version": adapter.version, "state": adapter.state,
                   "metrics": adapter.metrics,
                   "path": adapter.where(settings.adapters_dir),
                   "dataset_version": adapter.dataset_version}
    version, state, dataset_version = (trained["version"], trained["state"],
                                       trained["dataset_version"])
    name = f"{settings.serving.alias}-{version}"
    rename_run(f"retrain: {dataset_version} -> {name}")
    if state == "candidate" and settings.loop.canary_new_candidates:
        emit_event(PUBLISHED_EVENT, resource={"prefect.resource.id": f"tuneloop.adapter.{version}"},
                   payload={"version": version, "dataset_version": dataset_version,
                            "run_key": key})
    return {"version": version, "name": name, "state": state, "path": trained["path"],
            "run_key": key, "dataset_version": dataset_version, "metrics": trained["metrics"],
            "verdict": "trained"}


def _curate_and_train(settings: Settings, overrides: dict[str, Any] | None, store: AnyStore,
                      trigger: Check, key: str, dataset_version: str | None,
                      config_file: str | None, max_steps: int | None) -> dict[str, Any]:
    """Record the start, curate (unless given a version), train and publish; record how it
    ended. Returns what :func:`_train` returns, with the dataset version. ``settings`` were
    loaded with ``overrides``, which an in-process training run loads again."""
    started = time.monotonic()
    record(store, settings.home, Decision("retrain", None, None, "start", [trigger],
                                          {"run_key": key}))
    try:
        continue_from = settings.serving.alias if settings.loop.continue_from_production \
            else None
        if dataset_version is None:
            curation = curate(store, settings.embeddings, settings.curation,
                              settings.training.cpu_cores, key, settings.task, continue_from)
            dataset_version = curation.version
            create_markdown_artifact(key="curation-report", markdown=curation_markdown(curation),
                                     description=f"dataset {curation.version}")
        _, _, init = read_inputs(store, dataset_version, continue_from)
        trained = _train(settings, overrides, dataset_version, key, init, config_file,
                         max_steps)
    except (NothingNew, UnchangedAdapter) as exc:
        # Feedback since the last version all left out (or none came): no version, no run.
        # Or a run that kept production's weights: no candidate; it trained, so the loop's
        # cooldown counts from now (``trained``), as after a published candidate.
        figures: dict[str, Any] = {"run_key": key}
        if isinstance(exc, UnchangedAdapter):
            figures |= {"dataset": dataset_version, "trained": True,
                        "seconds": time.monotonic() - started}
        record(store, settings.home, Decision(
            "retrain", None, None, "skipped",
            [trigger, Check("skipped", INFO, None, None, "", str(exc))], figures))
        raise
    except Exception as exc:
        record(store, settings.home, Decision(
            "retrain", None, None, "failed",
            [trigger, Check("error", INFO, None, None, "", f"{type(exc).__name__}: {exc}")],
            {"run_key": key, "dataset": dataset_version}))
        raise
    create_markdown_artifact(key="training-report",
                             markdown=_training_markdown(trained, trained.get("run_dir")),
                             description=f"adapter {trained['name']}")
    # The recipe starts from zeros when production's adapter does not fit (another base
    # model, rank or target modules): say where the weights really started.
    continued = (trained["metrics"].get("training") or {}).get("continued_from")
    start = (f"production adapter {continued}" if continued else
             f"zeros (production adapter {init} does not fit this recipe)" if init else
             "zeros (no production adapter)")
    record(store, settings.home, Decision(
        "retrain", trained["version"], None, "trained",
        [trigger, Check("dataset", INFO, None, None, "", dataset_version),
         Check("from", INFO, None, None, "", start)],
        {"run_key": key, "dataset": dataset_version, "seconds": time.monotonic() - started,
         "continued_from": continued, "metrics": trained["metrics"]}))
    return trained | {"dataset_version": dataset_version}


def _train(settings: Settings, overrides: dict[str, Any] | None, dataset_version: str,
           key: str, init: str | None, config_file: str | None,
           max_steps: int | None) -> dict[str, Any]:
    """Train in this process, or as a run of ``train-adapter/<pool>`` on the training pool."""
    recipe_overrides = {"max_steps": max_steps}
    pool = settings.loop.train_work_pool
    if not pool:
        trained = train_adapter(dataset_version, key, init, config_file, recipe_overrides,
                                overrides=overrides)
        if trained.get("unchanged"):
            raise UnchangedAdapter(trained["unchanged"])
        return trained
    from prefect.deployments import run_deployment

    # The pool's machine has its own settings (file and environment): only the run's
    # inputs travel.
    params = {"dataset_version": dataset_version, "run_key": key, "init_adapter": init,
              "config_file": config_file, "recipe_overrides": recipe_overrides}
    for attempt in range(1 + POOL_RESUBMITS):
        run = run_deployment(f"train-adapter/{pool}", parameters=params, as_subflow=True)
        assert not asyncio.iscoroutine(run)
        if run.state is not None and run.state.is_crashed() and attempt < POOL_RESUBMITS:
            # Its machine died (tuneloop.flows.serve.ZOMBIE_AUTOMATION): the same run key
            # on the next machine resumes from the checkpoint in the object store.
            log.warning("training run %s on work pool %r crashed (%s); submitting it again",
                        run.name, pool, run.state.message)
            continue
        break
    assert not asyncio.iscoroutine(run)
    if run.state is None or not run.state.is_completed():
        raise RuntimeError(f"training on work pool {pool!r} ended "
                           f"{run.state.name if run.state else 'without a state'}")
    # The run published into the shared registry: read it from there (the pool's machine
    # keeps its own Prefect result storage).
    adapter = find_published(Store.of(settings), key)
    if adapter is None and (unchanged := _pool_unchanged(settings, key)) is not None:
        raise UnchangedAdapter(unchanged)
    if adapter is None:
        raise RuntimeError(f"training on work pool {pool!r} completed but published no adapter "
                           f"under run key {key}")
    return {"version": adapter.version, "name": adapter.name, "state": adapter.state,
            "path": adapter.where(settings.adapters_dir), "metrics": adapter.metrics,
            "run_dir": None}


def _pool_unchanged(settings: Settings, key: str) -> str | None:
    """Why the training pool's run ``key`` published nothing because it kept production's
    weights, when its finished run can be read here (the object store, or a shared runs
    directory); None otherwise."""
    run = read_finished_run(Workspace.of(settings), key)
    return unchanged_reason(run) if run is not None else None
