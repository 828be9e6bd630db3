"""The ``retrain`` flow: feedback in, a candidate adapter in the registry out, then the canary.

Wiring only; the work is in ``tuneloop.services.curation.store`` and ``training.pipeline``.

1. What started it: a drift alarm (``tuneloop.drift.detected``), enough new labels
   (``tuneloop.labels.accumulated``), the schedule, or a person (``tuneloop retrain``).
   An automatic retrain is skipped, with the reason recorded, while a canary is live
   or a held candidate waits for its next offline look, within ``loop.cooldown_s`` of
   the last one, or while a label production never learned has fewer than
   ``loop.min_examples_per_new_label`` examples (for at most ``loop.new_label_wait_s``);
   the deployment runs one at a time.
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

from tuneloop.flows.common import curation_markdown, image_markdown, rename_run
from tuneloop.flows.recovery import RESUMED_TAG
from tuneloop.runtime.cpu import pin
from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.canary import store as canary_store
from tuneloop.services.canary.core import INFO, Check, Decision
from tuneloop.services.curation.store import CurationRun, find_curated, new_labels, run_curation
from tuneloop.services.drift.embeddings import Embedder
from tuneloop.services.loop import metrics as loop_metrics
from tuneloop.services.registry.core import Adapter
from tuneloop.services.store.database import Store
from tuneloop.training.dataset import ChatExample, DatasetSplits
from tuneloop.training.pipeline import (
    TrainedRun,
    find_published,
    load_inputs,
    publish_run,
    recipe_config,
    train_candidate,
)

log = logging.getLogger(__name__)

PUBLISHED_EVENT = "tuneloop.adapter.published"
RETRIABLE = (TimeoutError, ConnectionError, OSError)


def _store(settings: Settings) -> Store:
    return Store(settings.db_path, settings.store.lock_timeout_s)


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
def find_adapter(settings: Settings, run_key: str) -> Adapter | None:
    return find_published(_store(settings), run_key)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_if_retriable,
      cache_policy=NONE)
def why_not(settings: Settings, run_key: str) -> str | None:
    """Why an automatic retrain should not start now, or None. A retrain run again under
    a key that already started (after a worker crash) goes on."""
    with _store(settings).connect() as con:
        if con.execute("SELECT 1 FROM canary_decisions WHERE stage = 'retrain' AND verdict = "
                       "'start' AND figures->>'run_key' = ? LIMIT 1", [run_key]).fetchall():
            return None  # it passed these checks when it started; a crash cut it short
        live = con.execute("SELECT version FROM adapters WHERE state = 'canary'").fetchall()
        if live:
            return f"canary {live[0][0]} is still in its live window"
        if settings.loop.canary_new_candidates:
            # A candidate the canary has not judged yet: a retrain now would compete with
            # its offline gate for the machine, and may well be unnecessary.
            waiting = con.execute(
                "SELECT a.version FROM adapters a WHERE a.state = 'candidate' AND "
                "a.created_at > now() - INTERVAL 2 HOUR AND NOT EXISTS (SELECT 1 FROM "
                "canary_decisions d WHERE d.stage = 'offline' AND d.candidate = a.version) "
                "ORDER BY a.created_at DESC LIMIT 1").fetchall()
            if waiting:
                return f"candidate {waiting[0][0]} is waiting for the canary's verdict"
        looking = con.execute(
            "SELECT d.candidate, CAST(d.figures->>'next_look_at' AS DOUBLE) FROM "
            "canary_decisions d JOIN adapters a ON a.version = d.candidate WHERE "
            "d.stage = 'offline' AND a.state = 'candidate' AND d.created_at = (SELECT "
            "max(created_at) FROM canary_decisions e WHERE e.stage = 'offline' AND "
            "e.candidate = d.candidate) AND CAST(d.figures->>'next_look_at' AS DOUBLE) > ? "
            "LIMIT 1", [time.time()]).fetchall()
        if looking:
            return (f"candidate {looking[0][0]} is waiting for more labelled events before its "
                    f"next offline look at {datetime.fromtimestamp(looking[0][1], UTC):%H:%M:%S}")
        running = con.execute(
            "SELECT s.created_at FROM canary_decisions s WHERE s.stage = 'retrain' "
            "AND s.verdict = 'start' AND s.created_at > now() - INTERVAL 2 HOUR "
            "AND NOT EXISTS (SELECT 1 FROM canary_decisions t WHERE t.stage = 'retrain' "
            "AND t.verdict IN ('trained', 'failed') AND t.created_at >= s.created_at "
            "AND t.figures->>'run_key' = s.figures->>'run_key') "
            "ORDER BY s.created_at DESC LIMIT 1").fetchall()
        if running:
            return f"a retrain started at {running[0][0]:%H:%M:%S} is still running"
        last = con.execute(
            "SELECT max(created_at) FROM canary_decisions WHERE stage = 'retrain' "
            "AND verdict = 'trained'").fetchall()[0][0]
    if last is not None:
        age = (datetime.now(UTC) - last).total_seconds()
        if age < settings.loop.cooldown_s:
            return (f"cool-down: the last retrain finished {age:.0f} s ago "
                    f"(loop.cooldown_s={settings.loop.cooldown_s})")
    return waiting_for_labels(settings)


def waiting_for_labels(settings: Settings) -> str | None:
    """Labels production never learned, still too thin to learn (and not waited on for
    longer than ``loop.new_label_wait_s``): a retrain now would teach them from a handful
    of examples, and the next drift alarm comes soon enough."""
    need, patience = settings.loop.min_examples_per_new_label, settings.loop.new_label_wait_s
    if not need:
        return None
    now = datetime.now(UTC)
    thin = [n for n in new_labels(_store(settings))
            if n.examples < need and (now - n.first_seen).total_seconds() < patience]
    if not thin:
        return None
    shown = ", ".join(f"{n.label} ({n.examples}/{need})" for n in thin[:4])
    more = f" and {len(thin) - 4} more" if len(thin) > 4 else ""
    return f"waiting for labelled examples of new labels: {shown}{more}"


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_if_retriable,
      cache_policy=NONE)
def curate(settings: Settings, run_key: str) -> CurationRun:
    pin(settings.training.cpu_cores)
    found = find_curated(_store(settings), run_key)
    if found is not None:
        log.info("retrain %s: dataset %s already curated", run_key, found.version)
        return found
    return run_curation(_store(settings), Embedder(settings.embeddings), settings.curation,
                        run_key=run_key)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_if_retriable,
      cache_policy=NONE)
def read_inputs(settings: Settings, dataset_version: str
                ) -> tuple[DatasetSplits, list[ChatExample], str | None]:
    """The dataset, the golden set, and the production adapter to continue from."""
    splits, golden = load_inputs(_store(settings), dataset_version)
    init = None
    if settings.loop.continue_from_production:
        with _store(settings).connect() as con:
            rows = con.execute(
                "SELECT path FROM adapters WHERE state = 'production' AND name = ? || '-' || "
                "version ORDER BY created_at DESC LIMIT 1", [settings.serving.alias]).fetchall()
        init = str(rows[0][0]) if rows else None
    return splits, golden, init


# A retry resumes from the run's last checkpoint, so it costs the steps since then.
@task(retries=1, retry_delay_seconds=10, cache_policy=NONE)
def train(settings: Settings, splits: DatasetSplits, golden: list[ChatExample],
          overrides: dict[str, Any], config_file: str | None, run_key: str,
          init_adapter: str | None, show_progress: bool) -> TrainedRun:
    config = recipe_config(settings, Path(config_file) if config_file else None, **overrides)
    return train_candidate(settings, splits, golden, config, run_key,
                           show_progress=show_progress,
                           init_adapter=Path(init_adapter) if init_adapter else None)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_if_retriable,
      cache_policy=NONE)
def publish(settings: Settings, run: TrainedRun) -> Adapter:
    return publish_run(_store(settings), settings, run)


@flow(name="train-adapter", log_prints=False)
def train_adapter(dataset_version: str, run_key: str, init_adapter: str | None = None,
                  config_file: str | None = None, overrides: dict[str, Any] | None = None,
                  show_progress: bool = False, settings: Settings | None = None
                  ) -> dict[str, Any]:
    """Train and publish one adapter (``tuneloop train``; what runs on
    ``loop.train_work_pool`` when one is set). ``overrides`` are recipe fields."""
    settings = settings or load_settings()
    adapter = find_adapter(settings, run_key)
    run: TrainedRun | None = None
    if adapter is None:
        splits, golden, _ = read_inputs(settings, dataset_version)
        run = train(settings, splits, golden, overrides or {}, config_file, run_key,
                    init_adapter, show_progress)
        adapter = publish(settings, run)
    return {"version": adapter.version, "name": adapter.name, "state": adapter.state,
            "path": adapter.path, "metrics": adapter.metrics,
            "run_dir": run.run_dir if run else None,
            "train_s": (run.timings.get("train_s") if run else None)}


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def record(settings: Settings, decision: Decision) -> str:
    with _store(settings).connect() as con:
        decision_id = canary_store.record_decision(con, decision,
                                                   str(flow_run.get_id() or "") or None)
    loop_metrics.count_decision(settings.home, decision.stage, decision.verdict)
    if "seconds" in decision.figures:
        loop_metrics.record(settings.home, "retrain", seconds=decision.figures["seconds"],
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
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Curate (unless ``dataset_version`` is given), train, publish a candidate, hand it to
    the canary. An automatic retrain (``automatic``, or ``trigger_id``: the event that
    started it, which is then its run key) is skipped while a canary is live or within the
    cool-down."""
    settings = settings or load_settings()
    automatic = automatic or trigger_id is not None
    key = run_key or (f"event-{trigger_id}" if automatic else f"flow-{flow_run.get_id()}")
    trigger = Check("trigger", INFO, None, None, "", reason)
    adapter = find_adapter(settings, key)
    if adapter is None and automatic:
        blocked = why_not(settings, key)
        if blocked:
            record(settings, Decision("retrain", None, None, "skipped",
                                      [trigger, Check("skipped", INFO, None, None, "", blocked)],
                                      {"run_key": key}))
            rename_run(f"retrain skipped: {blocked}"[:100])
            return {"verdict": "skipped", "reason": blocked, "run_key": key}
    started = time.monotonic()
    if adapter is None:
        record(settings, Decision("retrain", None, None, "start", [trigger], {"run_key": key}))
        try:
            if dataset_version is None:
                curation = curate(settings, key)
                dataset_version = curation.version
                create_markdown_artifact(key="curation-report",
                                         markdown=curation_markdown(curation),
                                         description=f"dataset {curation.version}")
            _, _, init = read_inputs(settings, dataset_version)
            trained = _train(settings, dataset_version, key, init, config_file, max_steps)
        except Exception as exc:
            record(settings, Decision(
                "retrain", None, None, "failed",
                [trigger, Check("error", INFO, None, None, "", f"{type(exc).__name__}: {exc}")],
                {"run_key": key, "dataset": dataset_version}))
            raise
        create_markdown_artifact(key="training-report",
                                 markdown=_training_markdown(trained, trained.get("run_dir")),
                                 description=f"adapter {trained['name']}")
        version, state = trained["version"], trained["state"]
        metrics, path = trained["metrics"], trained["path"]
        record(settings, Decision(
            "retrain", version, None, "trained",
            [trigger, Check("dataset", INFO, None, None, "", dataset_version),
             Check("from", INFO, None, None, "", f"production adapter {init}" if init
                   else "zeros (no production adapter)")],
            {"run_key": key, "dataset": dataset_version, "seconds": time.monotonic() - started,
             "continued_from": init, "metrics": metrics}))
    else:
        log.info("retrain %s: adapter %s already published, not training again", key,
                 adapter.version)
        version, state, metrics, path = adapter.version, adapter.state, adapter.metrics, \
            adapter.path
        dataset_version = adapter.dataset_version
    name = f"{settings.serving.alias}-{version}"
    rename_run(f"retrain: {dataset_version} -> {name}")
    if state == "candidate" and settings.loop.canary_new_candidates:
        emit_event(PUBLISHED_EVENT, resource={"prefect.resource.id": f"tuneloop.adapter.{version}"},
                   payload={"version": version, "dataset_version": dataset_version,
                            "run_key": key})
    return {"version": version, "name": name, "state": state, "path": path, "run_key": key,
            "dataset_version": dataset_version, "metrics": metrics, "verdict": "trained"}


def _train(settings: Settings, dataset_version: str, key: str, init: str | None,
           config_file: str | None, max_steps: int | None) -> dict[str, Any]:
    """Train in this process, or as a run of ``train-adapter/<pool>`` on the training pool."""
    overrides = {"max_steps": max_steps}
    pool = settings.loop.train_work_pool
    if not pool:
        return train_adapter(dataset_version, key, init, config_file, overrides,
                             settings=settings)
    from prefect.deployments import run_deployment

    params = {"dataset_version": dataset_version, "run_key": key, "init_adapter": init,
              "config_file": config_file, "overrides": overrides}
    run = run_deployment(f"train-adapter/{pool}", parameters=params, as_subflow=True)
    assert not asyncio.iscoroutine(run)
    if run.state is None or not run.state.is_completed():
        raise RuntimeError(f"training on work pool {pool!r} ended "
                           f"{run.state.name if run.state else 'without a state'}")
    # The run published into the shared registry: read it from there (the pool's machine
    # keeps its own Prefect result storage).
    adapter = find_published(_store(settings), key)
    if adapter is None:
        raise RuntimeError(f"training on work pool {pool!r} completed but published no adapter "
                           f"under run key {key}")
    return {"version": adapter.version, "name": adapter.name, "state": adapter.state,
            "path": adapter.path, "metrics": adapter.metrics, "run_dir": None}
