"""The ``curate`` flow: feedback -> a new immutable dataset version -> validated JSONL."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from services.curation_store import CurationRun, examples_of, load_tokenizer, run_curation
from services.datasets import export_jsonl, validate_jsonl
from services.embeddings import Embedder
from services.settings import Settings, load_settings
from services.store import Store


def _store(settings: Settings) -> Store:
    return Store(settings.db_path, settings.store.lock_timeout_s)


@task(retries=1, retry_delay_seconds=5)
def curate_task(settings: Settings) -> CurationRun:
    return run_curation(_store(settings), Embedder(settings.embeddings), settings.curation)


@task
def export_task(settings: Settings, version: str) -> dict[str, Any]:
    _, examples = examples_of(_store(settings), version)
    count_tokens = load_tokenizer(settings)
    out: dict[str, Any] = {}
    for fmt in ("chat", "completion"):
        path = export_jsonl(examples, settings.home / "datasets" / f"{version}.{fmt}.jsonl", fmt)
        check = validate_jsonl(path, fmt, count_tokens, settings.curation.max_tokens)
        if not check.ok:
            raise ValueError(f"{path} failed validation: {check.describe()}")
        out[fmt] = str(path)
    return out


@flow(name="curate")
def curate_flow(settings: Settings | None = None) -> dict[str, Any]:
    """Curate a new dataset version from feedback and export it as validated JSONL."""
    settings = settings or load_settings()
    run = curate_task(settings)
    exports = export_task(settings, run.version)
    get_run_logger().info("dataset %s (%s): %s", run.version, run.content_hash[:12], run.report)
    return {"version": run.version, "content_hash": run.content_hash, "report": run.report,
            "exports": exports}
