"""The ``curate`` flow: feedback -> a new immutable dataset version -> validated JSONL.

The version is the curation stage's entry point,
:func:`tuneloop.services.curation.run.run_curation`; this flow exports and checks it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from tuneloop.flows.common import curation_markdown, flow_settings, rename_run
from tuneloop.runtime.cpu import pinned
from tuneloop.runtime.settings import CurationSettings, EmbeddingSettings, TaskSpec
from tuneloop.services.curation.datasets import export_jsonl, validate_jsonl
from tuneloop.services.curation.run import run_curation
from tuneloop.services.curation.store import CurationRun, examples_of
from tuneloop.services.drift.embeddings import Embedder
from tuneloop.services.store.database import AnyStore, Store
from tuneloop.training.tokenizer import token_counter


@task(retries=1, retry_delay_seconds=5, cache_policy=NONE)
def curate_task(store: AnyStore, embeddings: EmbeddingSettings, curation: CurationSettings,
                cpu_cores: str | None, include_used: bool, task: TaskSpec) -> CurationRun:
    with pinned(cpu_cores):
        return run_curation(store, Embedder(embeddings), curation, include_used=include_used,
                            task=task)


@task(cache_policy=NONE)
def export_task(store: AnyStore, version: str, folder: Path, base_model: str, models_dir: Path,
                max_tokens: int) -> dict[str, Any]:
    """Both JSONL formats of ``version``, each checked; raises ``ValueError`` for a bad one."""
    _, examples = examples_of(store, version)
    count_tokens = token_counter(base_model, models_dir)
    out: dict[str, Any] = {}
    for fmt in ("chat", "completion"):
        path = export_jsonl(examples, folder / f"{version}.{fmt}.jsonl", fmt)
        check = validate_jsonl(path, fmt, count_tokens, max_tokens)
        if not check.ok:
            raise ValueError(f"{path} failed validation: {check.describe()}")
        out[fmt] = {"path": str(path), "check": check.describe()}
    return out


@flow(name="curate")
def curate_flow(include_used: bool = False, export_dir: str | None = None,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Curate a new dataset version from feedback and export it as validated JSONL.

    ``overrides`` are settings by dotted name (``{"curation.replay_share": 0.3}``),
    applied over the file and the environment; a secret is refused.
    """
    settings = flow_settings(overrides)
    store = Store.of(settings)
    run = curate_task(store, settings.embeddings, settings.curation,
                      settings.training.cpu_cores, include_used, settings.task)
    exports = export_task(store, run.version, Path(export_dir or settings.home / "datasets"),
                          settings.training.base_model, settings.models_dir,
                          settings.curation.max_tokens)
    get_run_logger().info("dataset %s (%s): %s", run.version, run.content_hash[:12], run.report)
    create_markdown_artifact(key="curation-report", markdown=curation_markdown(run),
                             description=f"dataset {run.version}")
    rename_run(f"curate: {run.version} ({run.report.get('kept', 0):,} kept)")
    return {"version": run.version, "content_hash": run.content_hash, "report": run.report,
            "parents": run.parents, "exports": exports}
