"""``tuneloop gateway``: the OpenAI-compatible gateway in the foreground (``up`` starts it)."""

from __future__ import annotations

from pathlib import Path

import typer

from tuneloop.cli.common import fail, settings_of


def register(app: typer.Typer) -> None:
    app.command("gateway")(gateway)


def served_model(settings_home_models: Path, base_model: str) -> tuple[str, str]:
    """(path vLLM loads, name it serves the base model under)."""
    from tuneloop.training.base_model import resolve_base_model

    base = resolve_base_model(base_model, settings_home_models)
    name = Path(base.model_id).name if Path(base.model_id).is_absolute() else base.model_id
    return base.path, name


def gateway(ctx: typer.Context) -> None:
    """Serve the OpenAI-compatible endpoint; starts and supervises the vLLM replicas."""
    from tuneloop.serving.gateway.app import run_gateway
    from tuneloop.serving.vllm_process import VLLMNotInstalledError

    settings = settings_of(ctx)
    try:
        path, name = served_model(settings.models_dir, settings.training.base_model)
        run_gateway(settings, path, name)
    except (VLLMNotInstalledError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
