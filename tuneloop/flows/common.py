"""What every tuneloop flow does alike: load its settings, name its run after what
happened, show a picture."""

from __future__ import annotations

import base64
import logging
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.runtime import flow_run
from pydantic import BaseModel, SecretBytes, SecretStr

from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.curation.store import CurationRun

log = logging.getLogger(__name__)


class SecretOverride(ValueError):
    """A flow was asked to override a secret setting: Prefect stores and shows every flow
    parameter, so a secret reaches a flow only through the environment or the file."""


def flow_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """The settings a flow run works with: the file and the environment, then
    ``overrides`` (dotted setting names, such as ``"curation.replay_share"``, to values).

    Flows take these names and values as a parameter instead of a ``Settings`` object,
    which holds secrets. Raises :class:`SecretOverride` for a name that is a secret, or a
    section holding one (``serving.admin_key``, ``serving``), and what
    :func:`~tuneloop.runtime.settings.load_settings` raises for an unknown name or a bad
    value.
    """
    secrets = secret_settings()
    for name in overrides or {}:
        hidden = sorted(s for s in secrets if s == name or s.startswith(f"{name}."))
        if hidden:
            raise SecretOverride(
                f"flow override {name!r} would set the secret {', '.join(hidden)}: flow "
                "parameters are stored and shown by Prefect; set it in the environment "
                "(TUNELOOP_<SECTION>__<FIELD>) or the settings file instead")
    return load_settings(dict(overrides or {}))


def secret_settings() -> frozenset[str]:
    """The dotted names of every secret setting (those typed ``SecretStr``/``SecretBytes``)."""
    return frozenset(_secrets(Settings, ""))


def _secrets(model: type[BaseModel], prefix: str) -> Iterator[str]:
    for name, field in model.model_fields.items():
        kinds = {field.annotation, *typing.get_args(field.annotation)}
        if kinds & {SecretStr, SecretBytes}:
            yield prefix + name
        for kind in kinds:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from _secrets(kind, f"{prefix}{name}.")


def rename_run(name: str) -> None:
    """Give the current flow run a name that says what it did (``retrain: ds-4 -> v5``)."""
    run_id = flow_run.get_id()
    if not run_id:
        return
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(UUID(str(run_id)), name=name[:120])
    except Exception:  # noqa: BLE001 - a name is cosmetic; the run's result is what counts
        log.warning("could not rename flow run %s to %r", run_id, name, exc_info=True)


def image_markdown(path: Path | None, alt: str) -> str:
    """An inline PNG for a Prefect markdown artifact, plus where the file lives."""
    if path is None or not Path(path).exists():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"\n\n![{alt}](data:image/png;base64,{data})\n\n{alt}: `{path}`\n"


def curation_markdown(run: CurationRun) -> str:
    """A dataset version's curation report as Markdown: what was kept, and why the rest not."""
    report = run.report
    lines = [f"## dataset {run.version}", "", f"content hash `{run.content_hash[:16]}`, "
             f"parents {', '.join(run.parents) or 'none'}", "",
             "| figure | value |", "|---|---|"]
    for key in ("considered", "kept", "carried", "known_label_train_capped", "replayed",
                "golden_guarded"):
        if key in report:
            lines.append(f"| {key} | {report[key]:,} |")
    for split, n in (report.get("splits") or {}).items():
        lines.append(f"| {split} | {n:,} |")
    dropped = report.get("dropped") or {}
    if dropped:
        lines += ["", "| dropped because | events |", "|---|---|"]
        lines += [f"| {why} | {n:,} |" for why, n in sorted(dropped.items(), key=lambda x: -x[1])]
    labels = report.get("labels") or {}
    if labels:
        lines += ["", f"{len(labels)} labels kept"]
    return "\n".join(lines)
