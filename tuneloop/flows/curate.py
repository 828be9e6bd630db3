"""The ``curate`` flow: feedback -> a new immutable dataset version -> validated JSONL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tuneloop.flows.common import curation_markdown, rename_run
from tuneloop.runtime.cpu import pin
from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.curation.datasets import export_jsonl, validate_jsonl
from tuneloop.services.curation.store import CurationRun, examples_of, load_tokenizer, run_curation
from tuneloop.services.drift.embeddings import Embedder
from tuneloop.services.store.database import Store


def _store(settings: Settings) -> Store:
    return Store(settings.db_path, settings.store.lock_timeout_s)


@task(retries=1, retry_delay_seconds=5)
def curate_task(settings: Settings, include_used: bool) -> CurationRun:
    pin(settings.training.cpu_cores)
    return run_curation(_store(settings), Embedder(settings.embeddings), settings.curation,
                        include_used=include_used)


@task
def export_task(settings: Settings, version: str, folder: str | None) -> dict[str, Any]:
    _, examples = examples_of(_store(settings), version)
    count_tokens = load_tokenizer(settings)
    out: dict[str, Any] = {}
    for fmt in ("chat", "completion"):
        path = export_jsonl(examples, Path(folder or settings.home / "datasets")
                            / f"{version}.{fmt}.jsonl", fmt)
        check = validate_jsonl(path, fmt, count_tokens, settings.curation.max_tokens)
        if not check.ok:
            raise ValueError(f"{path} failed validation: {check.describe()}")
        out[fmt] = {"path": str(path), "check": check.describe()}
    return out


@flow(name="curate")
def curate_flow(include_used: bool = False, export_dir: str | None = None,
                settings: Settings | None = None) -> dict[str, Any]:
    """Curate a new dataset version from feedback and export it as validated JSONL."""
    settings = settings or load_settings()
    run = curate_task(settings, include_used)
    exports = export_task(settings, run.version, export_dir)
    get_run_logger().info("dataset %s (%s): %s", run.version, run.content_hash[:12], run.report)
    create_markdown_artifact(key="curation-report", markdown=curation_markdown(run),
                             description=f"dataset {run.version}")
    rename_run(f"curate: {run.version} ({run.report.get('kept', 0):,} kept)")
    return {"version": run.version, "content_hash": run.content_hash, "report": run.report,
            "parents": run.parents, "exports": exports}
