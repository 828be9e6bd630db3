"""The ``detect_drift`` flow: the drift stage's check, then the report's artifact and events.

The check itself (windows -> embeddings -> tests -> stored report) is the stage's entry
point, :func:`tuneloop.services.drift.check.run_check`; this flow only wires around it.
On drift it emits ``tuneloop.drift.detected`` (resource ``tuneloop.drift-report.<id>``);
when ``loop.retrain_min_new_labels`` labelled events arrived since the last dataset
version it emits ``tuneloop.labels.accumulated``. The ``retrain/loop`` deployment's
trigger turns either into a retrain. The report, with its clusters and the score history
plot, is the run's artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.events import emit_event

from tuneloop.flows.common import flow_settings, image_markdown, rename_run
from tuneloop.runtime.cpu import pinned
from tuneloop.runtime.settings import DriftSettings, EmbeddingSettings
from tuneloop.services.curation.store import new_labelled_events
from tuneloop.services.drift.check import run_check
from tuneloop.services.drift.core import UNIT, DriftReport
from tuneloop.services.drift.embeddings import Embedder
from tuneloop.services.drift.store import NotEnoughEvents, report_history
from tuneloop.services.loop import metrics as loop_metrics
from tuneloop.services.store.database import AnyStore, Store

DRIFT_EVENT = "tuneloop.drift.detected"
LABELS_EVENT = "tuneloop.labels.accumulated"


@task(retries=1, retry_delay_seconds=5, cache_policy=NONE)
def check_task(store: AnyStore, embeddings: EmbeddingSettings, drift: DriftSettings,
               alias: str, cpu_cores: str | None) -> tuple[str, DriftReport] | str:
    """The drift stage's check (report id and report), or why there is nothing to compare yet."""
    with pinned(cpu_cores):
        try:
            return run_check(store, Embedder(embeddings), drift, alias)
        except NotEnoughEvents as exc:
            return str(exc)


@task
def emit_task(report_id: str, report: DriftReport) -> str | None:
    event = emit_event(
        DRIFT_EVENT,
        resource={"prefect.resource.id": f"tuneloop.drift-report.{report_id}"},
        payload={
            "report_id": report_id,
            "score": report.score,
            "unit": UNIT,
            "novel_share": report.score,
            "min_novel_share": report.min_novel_share,
            "p_value": report.p_value,
            "changed": report.changed,
            "reference": report.reference_desc,
            "current": report.current_desc,
            "clusters": [
                {"name": c["name"], "status": c["status"], "size": c["size"],
                 "share": c["share"]}
                for c in report.clusters
            ],
        },
    )
    return str(event.id) if event else None


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def count_new_labels(store: AnyStore) -> int:
    return new_labelled_events(store)


@task
def emit_labels(count: int, threshold: int) -> str | None:
    event = emit_event(LABELS_EVENT, resource={"prefect.resource.id": "tuneloop.feedback"},
                       payload={"new_labels": count, "threshold": threshold})
    return str(event.id) if event else None


@task(cache_policy=NONE)
def report_artifact(store: AnyStore, reports_dir: Path, report_id: str, report: DriftReport) -> None:
    from tuneloop.services.drift.plots import plot_drift_history

    with store.connect() as con:
        rows = report_history(con)
    plot = None
    if len(rows) >= 1:
        plot = plot_drift_history(rows, reports_dir / "drift-history.png")
    verdict = "**DRIFT**" if report.drifted else "no drift"
    lines = [f"## drift check: {verdict}", "",
             f"**novel share {report.score:.1%}** ({UNIT}; p = {report.p_value:.4f}); the loop "
             f"acts at {report.min_novel_share:.0%} or more when significant. Traffic "
             f"{'changed' if report.changed else 'did not change'} by the MMD and classifier "
             "tests.", "", f"`{report.summary()}`", "",
             f"reference: {report.reference_desc}; current: {report.current_desc}", "",
             "| cluster | status | events | share now | share before | labels | examples |",
             "|---|---|---|---|---|---|---|"]
    for c in report.clusters:
        labels = ", ".join(f"{lab['label']} ({lab['current']})" for lab in c.get("labels", []))
        examples = " / ".join(str(e)[:60] for e in c.get("examples", [])[:2])
        lines.append(f"| {c['name']} | {c['status']} | {c['size']} | {c['share']:.1%} | "
                     f"{c['reference_share']:.1%} | {labels} | {examples} |")
    create_markdown_artifact(key="drift-report", markdown="\n".join(lines)
                             + image_markdown(plot, "drift score over time"),
                             description=f"report {report_id}: {report.summary()[:200]}")


@flow(name="detect_drift")
def detect_drift_flow(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare the current window with the reference; persist the report; emit on drift.

    ``overrides`` are settings by dotted name (``{"drift.current_window_events": 500}``),
    applied over the file and the environment; a secret is refused.
    """
    settings = flow_settings(overrides)
    store = Store.of(settings)
    checked = check_task(store, settings.embeddings, settings.drift, settings.serving.alias,
                         settings.training.cpu_cores)
    if isinstance(checked, str):
        rename_run("drift: waiting for events")
        get_run_logger().info("no drift check yet: %s", checked)
        return {"report_id": None, "drifted": False, "waiting": checked}
    report_id, report = checked
    report_artifact(store, settings.home / "reports", report_id, report)
    loop_metrics.record(settings.home, "drift", score=report.score, drifted=report.drifted,
                        p_value=report.p_value, report_id=report_id)
    event_id = emit_task(report_id, report) if report.drifted else None
    labels_event = None
    threshold = settings.loop.retrain_min_new_labels
    new_labels = count_new_labels(store) if threshold else 0
    if threshold and new_labels >= threshold:
        labels_event = emit_labels(new_labels, threshold)
    get_run_logger().info("drift report %s: %s", report_id, report.summary())
    rename_run(_run_name(report))
    return {
        "report_id": report_id, "drifted": report.drifted, "score": report.score,
        "p_value": report.p_value, "event_id": event_id, "summary": report.summary(),
        "reference": report.reference_desc, "current": report.current_desc,
        "clusters": report.clusters, "new_labels": new_labels, "labels_event_id": labels_event,
    }


def _run_name(report: DriftReport) -> str:
    new = [c["name"] for c in report.clusters if c["status"] in ("new", "grew")]
    return (f"drift: {'DRIFT' if report.drifted else 'no drift'} "
            f"(novel share {report.score:.2f})"
            + (f"; new: {', '.join(new[:3])}" if report.drifted and new else ""))
