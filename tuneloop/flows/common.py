"""What every tuneloop flow does alike: name its run after what happened, show a picture."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from uuid import UUID

from prefect.runtime import flow_run

from tuneloop.services.curation.store import CurationRun

log = logging.getLogger(__name__)


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
    for key in ("considered", "kept", "known_label_train_capped", "replayed", "golden_guarded"):
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
