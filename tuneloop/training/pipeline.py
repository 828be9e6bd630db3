"""One training run end to end: read the data, train, evaluate, publish. No Prefect needed.

The steps are separate functions so the ``retrain`` flow can make each a task,
and each is safe to repeat:
- :func:`train_candidate` works in ``runs_dir/<run key>``; a retry resumes from the
  last checkpoint, and a run that already finished returns its saved result.
- :func:`publish_run` returns the adapter already published under the run key
  instead of publishing a second copy.
The store is held only for the reads and the publish, never while training.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.runtime.cpu import pinned
from tuneloop.runtime.files import write_json_atomic
from tuneloop.runtime.settings import (
    EmbeddingSettings,
    ObjectStoreSettings,
    Settings,
    TaskSpec,
    TrainingSettings,
)
from tuneloop.services.curation.golden import judgeable, unjudgeable_note
from tuneloop.services.evaluation.tasks import SCORE_NAMES, Embed
from tuneloop.services.registry.core import Adapter
from tuneloop.services.registry.remote import RemoteAdapters, adapter_cache_dir, files_of
from tuneloop.services.registry.store import (
    find_by_run_key,
    get_adapter,
    production,
    publish_adapter,
)
from tuneloop.services.store.database import AnyStore, Store
from tuneloop.training.base_model import BaseModel, resolve_base_model
from tuneloop.training.config import DEFAULT_CONFIG, RecipeConfig
from tuneloop.training.dataset import ChatExample, DatasetSplits, read_dataset, read_golden
from tuneloop.training.preference import ranking_accuracy, train_dpo
from tuneloop.training.recipe import LoRARecipe
from tuneloop.training.run_store import RunStore

log = logging.getLogger(__name__)
RESULT = "result.json"


@dataclass(frozen=True)
class TrainedRun:
    """A finished run waiting to be published (saved as ``result.json`` in its directory)."""

    run_key: str
    run_dir: str
    adapter_dir: str
    dataset_version: str
    base: BaseModel
    config: dict[str, Any]
    metrics: dict[str, Any]
    timings: dict[str, float]

    @classmethod
    def load(cls, path: Path) -> TrainedRun:
        raw = json.loads(path.read_text())
        raw["base"] = BaseModel(**raw["base"])
        return cls(**raw)


class UnchangedAdapter(ValueError):
    """A run continued from production's adapter never lowered the validation loss below
    where it started, so early stopping kept the starting weights: a candidate that is
    production itself, which no canary could ever promote."""


def unchanged_reason(run: TrainedRun) -> str | None:
    """Why ``run`` has nothing to publish (its weights are the adapter it continued from),
    or None when it has."""
    training = run.metrics.get("training") or {}
    if not training.get("continued_from") or training.get("best_step") != 0:
        return None
    if (run.metrics.get("preference") or {}).get("steps", 0) > 0:
        return None  # DPO moved the weights after SFT kept (or, for dpo, skipped) them
    return (f"training from production adapter {training['continued_from']} did not lower "
            f"the validation loss below its start ({training.get('initial_val_loss', 0.0):.4f}) "
            f"in {training.get('steps', 0)} steps: the weights are production's, nothing to "
            f"publish (the dataset's examples are carried into the next retrain)")


@dataclass(frozen=True)
class Workspace:
    """What a training run needs of the settings: the training section, where runs, base
    models and adapters live, and the alias it publishes under."""

    training: TrainingSettings
    runs_dir: Path
    models_dir: Path
    adapters_dir: Path
    alias: str
    task: TaskSpec = field(default_factory=TaskSpec)
    # Where adapters are published and read when they live in object storage
    # (store.artifacts), and this process's cache of them.
    object_store: ObjectStoreSettings = field(default_factory=ObjectStoreSettings)
    artifacts: bool = False
    cache_dir: Path | None = None
    # The deployed embedding model: a text task's report has the cosine similarity of
    # answer and reference under it, as the canary's has.
    embeddings: EmbeddingSettings = field(default_factory=EmbeddingSettings)

    @classmethod
    def of(cls, settings: Settings) -> Workspace:
        return cls(settings.training, settings.runs_dir, settings.models_dir,
                   settings.adapters_dir, settings.serving.alias, settings.task,
                   settings.object_store, settings.store.artifacts,
                   adapter_cache_dir(settings), settings.embeddings)

    def embed(self) -> Embed | None:
        """What a text task's report embeds answers and references with (None for the
        other kinds)."""
        from tuneloop.services.drift.embeddings import answer_embed

        return answer_embed(self.task.kind, self.embeddings)

    def remote(self) -> RemoteAdapters:
        """The object-stored adapters, through this process's cache."""
        return RemoteAdapters(self.object_store, self.cache_dir or self.runs_dir / "cache")

    def adapter_files(self, adapter: Adapter) -> Path:
        """``adapter``'s files on this machine, verified (fetched first from object
        storage into this process's cache)."""
        return files_of(adapter, self.adapters_dir, self.remote())


def recipe_config(training: TrainingSettings, config_file: Path | None = None,
                  **overrides: Any) -> RecipeConfig:
    """The recipe config: the file given, else ``training.config``, else the shipped default.

    Raises :class:`~tuneloop.training.config.ConfigError` for a bad file or override.
    """
    path = config_file or training.config or DEFAULT_CONFIG
    if training.objective is not None:
        overrides = {"objective": training.objective, **overrides}
    return RecipeConfig.from_file(Path(path), **overrides)


def run_dir_for(where: Settings | Workspace, run_key: str) -> Path:
    """The directory of the run ``run_key`` under ``where``'s runs directory."""
    return where.runs_dir / re.sub(r"[^A-Za-z0-9_.-]+", "_", run_key)


def load_inputs(store: AnyStore, dataset_version: str) -> tuple[DatasetSplits, list[ChatExample]]:
    """Read the dataset version and the golden set, then let go of the store."""
    with store.connect() as con:
        return read_dataset(con, dataset_version), read_golden(con)


def find_published(store: AnyStore, run_key: str) -> Adapter | None:
    """The adapter published under ``run_key``, if one was."""
    with store.connect() as con:
        return find_by_run_key(con, run_key)


def production_version(store: AnyStore, alias: str) -> str | None:
    """``alias``'s production version, which a retrain continues from; None when the base
    model serves the alias."""
    with store.connect() as con:
        adapter = production(con, alias)
    return adapter.version if adapter else None


def init_adapter_dir(store: AnyStore, workspace: Workspace, init: str | None) -> Path | None:
    """Where a run's weights start: ``init`` is an adapter version in the registry (its
    files fetched into this machine's cache and verified: the worker that trains may be
    on another machine than the one that asked) or a directory."""
    if not init:
        return None
    if re.fullmatch(r"v\d+", init):
        with store.connect() as con:
            adapter = get_adapter(con, init)
        return workspace.adapter_files(adapter)
    return Path(init)


def train_candidate(
    workspace: Workspace,
    splits: DatasetSplits,
    golden: list[ChatExample],
    config: RecipeConfig,
    run_key: str,
    *,
    show_progress: bool = True,
    init_adapter: Path | None = None,
) -> TrainedRun:
    """Train, evaluate and save an adapter for ``splits``; resumable, idempotent by run key.

    ``init_adapter`` (production's adapter directory) is where the weights start, when it
    has this recipe's rank and target modules; zeros otherwise.
    """
    run_dir = run_dir_for(workspace, run_key)
    run_dir.mkdir(parents=True, exist_ok=True)
    # One trainer a run directory: a second process with the same run key (a resubmitted
    # run while the first still lives) waits, then finds the finished result.
    with _run_lock(run_dir), pinned(workspace.training.cpu_cores):
        return _train_locked(workspace, splits, golden, config, run_key, run_dir,
                             show_progress, init_adapter)


@contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    with (run_dir / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _finished_run(path: Path) -> TrainedRun | None:
    """The run recorded in ``path``; None when there is none, or when the file cannot be
    read as one (cut short by a crash of a version that wrote it in place): that file is
    set aside beside it and the run trains again."""
    try:
        return TrainedRun.load(path)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
        path.rename(aside)
        log.warning("run %s: %s is unreadable (%s); set aside as %s, training again",
                    path.parent.name, path.name, exc, aside.name)
        return None


def read_finished_run(workspace: Workspace, run_key: str) -> TrainedRun | None:
    """The finished run ``run_key`` as this machine can read it (pulled from the object
    store first under ``store.artifacts``); None when there is none here."""
    run_dir = run_dir_for(workspace, run_key)
    if workspace.artifacts:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            RunStore(workspace.object_store, run_dir.name).pull_result(run_dir)
        except Exception as exc:  # noqa: BLE001 - a run that cannot be read here is none
            log.warning("run %s: its result in the object store cannot be read: %s",
                        run_key, exc)
            return None
    try:
        return TrainedRun.load(run_dir / RESULT)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _train_locked(workspace: Workspace, splits: DatasetSplits, golden: list[ChatExample],
                  config: RecipeConfig, run_key: str, run_dir: Path, show_progress: bool,
                  init_adapter: Path | None) -> TrainedRun:
    # store.artifacts: the run's checkpoints and its finished result live in the object
    # store too, so a worker on another machine finishes or resumes it.
    mirror = RunStore(workspace.object_store, run_dir.name) if workspace.artifacts else None
    if mirror is not None:
        mirror.pull_result(run_dir)
    finished = _finished_run(run_dir / RESULT)
    if finished is not None:
        log.info("run %s: already trained, reusing %s", run_key, run_dir / RESULT)
        return finished
    started = time.perf_counter()
    if config.objective == "dpo" and not any(p.split == "train" for p in splits.preferences):
        raise ValueError(f"objective dpo: dataset {splits.version} has no train preference "
                         "pairs (no corrections or side-by-side verdicts); use sft or sft+dpo")
    base = resolve_base_model(workspace.training.base_model, workspace.models_dir)
    if mirror is not None:
        mirror.pull_checkpoint(run_dir / "checkpoint")
    recipe = LoRARecipe(config, base, run_dir, device=workspace.training.device, run_id=run_key,
                        show_progress=show_progress, init_adapter=init_adapter,
                        on_checkpoint=mirror.push_checkpoint if mirror is not None else None)
    try:
        recipe.setup(splits.train, splits.validation)
        metrics: dict[str, Any] = {}
        golden, metrics["golden_left_out"] = judgeable_golden(golden, workspace.task, run_key)
        embed = workspace.embed()  # one embedding model for the run's reports
        t0 = time.perf_counter()
        if golden:
            metrics["base_golden"] = _base_golden(workspace, recipe, base, config, golden,
                                                  embed)
        result = recipe.train()
        metrics["training"] = result.metrics() | {
            "continued_from": str(init_adapter) if recipe.continued else None,
            "objective": config.objective}
        if config.objective != "sft":
            metrics["preference"] = _preference_step(recipe, splits, config, show_progress)
        validation, _ = recipe.evaluate(judgeable(splits.validation, workspace.task)[0],
                                        workspace.task, embed)
        metrics["validation"] = validation.to_dict()
        if golden:
            adapter_golden, _ = recipe.evaluate(golden, workspace.task, embed)
            metrics["golden"] = adapter_golden.to_dict()
        eval_s = time.perf_counter() - t0 - result.train_s
        adapter_dir = run_dir / "adapter"
        shutil.rmtree(adapter_dir, ignore_errors=True)
        recipe.save_adapter(adapter_dir)
    finally:
        recipe.cleanup()
    timings = {**recipe.timings, "eval_s": eval_s, "total_s": time.perf_counter() - started}
    run = TrainedRun(run_key, str(run_dir), str(adapter_dir), splits.version, base,
                     config.to_dict(), metrics, timings)
    # result.json last, whole or not at all: its presence means the run finished.
    write_json_atomic(run_dir / RESULT, asdict(run))
    if mirror is not None:
        mirror.push_result(run_dir)
    log.info("run %s: trained on %s, val loss %.4f -> %.4f, golden accuracy %s -> %s", run_key,
             splits.version, result.initial_val_loss, result.best_val_loss,
             _headline(metrics.get("base_golden")), _headline(metrics.get("golden")))
    return run


def judgeable_golden(golden: list[ChatExample], task: TaskSpec, run_key: str
                     ) -> tuple[list[ChatExample], int]:
    """The golden examples ``task`` can judge, and how many it cannot (logged with the fix):
    a ``json`` reference that is not an object would stop the run before it trains."""
    kept, left_out = judgeable(golden, task)
    if left_out:
        log.warning("run %s: %s", run_key, unjudgeable_note(left_out, len(golden)))
    return kept, left_out


def _preference_step(recipe: LoRARecipe, splits: DatasetSplits, config: RecipeConfig,
                     show_progress: bool) -> dict[str, Any]:
    """DPO on the dataset's train pairs, with the held-out pairs' ranking accuracy before
    and after (:mod:`tuneloop.training.preference`)."""
    train = [p for p in splits.preferences if p.split == "train"]
    held_out = [p for p in splits.preferences if p.split != "train"]
    if not train:
        log.info("run %s: no train preference pairs in %s; DPO skipped", recipe.run_id,
                 splits.version)
        return {"objective": config.objective, "skipped": "no train preference pairs",
                "held_out_pairs": len(held_out)}
    before = ranking_accuracy(recipe.model, recipe.tokenizer, held_out, recipe.device)
    figures = train_dpo(recipe.model, recipe.tokenizer, train, config, device=recipe.device,
                        show_progress=show_progress)
    after = ranking_accuracy(recipe.model, recipe.tokenizer, held_out, recipe.device)
    log.info("run %s: DPO on %d pairs; held-out ranking accuracy %s -> %s", recipe.run_id,
             len(train), before, after)
    return figures | {"objective": config.objective, "held_out_pairs": len(held_out),
                      "ranking_accuracy_before": before, "ranking_accuracy_after": after}


def _base_golden(workspace: Workspace, recipe: LoRARecipe, base: BaseModel,
                 config: RecipeConfig, golden: list[ChatExample], embed: Embed | None = None
                 ) -> dict[str, Any]:
    """The base model's metrics on the golden set. The base model does not change between
    runs: they are computed once per base model, golden set, device and generation settings,
    and kept under ``<runs>/base-evaluations``."""
    key = hashlib.sha256(json.dumps({
        "base": [base.model_id, base.path, base.sha256],
        "device": [recipe.device.type, str(recipe.autocast_dtype)],
        "generation": [config.generation_max_new_tokens, config.generation_batch_size,
                       config.task_eval_max_examples],
        "task": workspace.task.describe(),
        "embeddings": workspace.embeddings.model if workspace.task.kind == "text" else None,
        "golden": [asdict(e) for e in golden],
    }, sort_keys=True, default=str).encode()).hexdigest()
    path = workspace.runs_dir / "base-evaluations" / f"{key}.json"
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError):
        pass
    report, _ = recipe.evaluate_base(golden, workspace.task, embed)
    write_json_atomic(path, report.to_dict())
    return report.to_dict()


def publish_run(store: AnyStore, workspace: Workspace, run: TrainedRun) -> Adapter:
    """Publish ``run``'s adapter, or return the one already published for its run key."""
    with store.connect() as con:
        existing = find_by_run_key(con, run.run_key)
        if existing is not None:
            log.info("run %s: already published as %s", run.run_key, existing.version)
            return existing
        return publish_adapter(
            con, workspace.adapters_dir, Path(run.adapter_dir), alias=workspace.alias,
            remote=workspace.remote() if workspace.artifacts else None,
            base_model=run.base.model_id, base_hash=run.base.sha256,
            dataset_version=run.dataset_version, run_key=run.run_key,
            details={"base_model_path": run.base.path, "hyperparameters": run.config,
                     "metrics": run.metrics, "timings": run.timings,
                     "task": workspace.task.describe()},
        )


def train_and_publish(settings: Settings, dataset_version: str, config: RecipeConfig,
                      run_key: str, *, show_progress: bool = True) -> Adapter:
    """The whole run without an orchestrator: train ``dataset_version`` and publish the
    candidate, or return the adapter already published under ``run_key``. (``tuneloop
    train`` runs the same steps as the ``train-adapter`` flow.)"""
    store = Store.of(settings)
    existing = find_published(store, run_key)
    if existing is not None:
        return existing
    splits, golden = load_inputs(store, dataset_version)
    workspace = Workspace.of(settings)
    run = train_candidate(workspace, splits, golden, config, run_key,
                          show_progress=show_progress)
    return publish_run(store, workspace, run)


def default_run_key(dataset_version: str, config: RecipeConfig, base_model: str) -> str:
    """Same data, config and base model: same key, so a repeated command trains once."""
    return f"{dataset_version}-{config.fingerprint()[:12]}-{_slug(base_model)}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[-40:]


def _headline(report: dict[str, Any] | None) -> str:
    if not report:
        return "n/a"
    if report.get("kind") in ("json", "text") and report.get("score") is not None:
        return f"{SCORE_NAMES[report['kind']]} {report['score']:.3f}"
    value = report.get("accuracy")
    return f"{value:.3f}" if value is not None else f"em {report.get('exact_match', 0):.3f}"
