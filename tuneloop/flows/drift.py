"""The ``detect_drift`` flow: windows -> embeddings -> tests -> report -> events.

On drift it emits ``tuneloop.drift.detected`` (resource ``tuneloop.drift-report.<id>``);
when ``loop.retrain_min_new_labels`` labelled events arrived since the last dataset
version it emits ``tuneloop.labels.accumulated``. The ``retrain/on-event`` deployment's
trigger turns either into a retrain. The report, with its clusters and the score history
plot, is the run's artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from tuneloop.flows.common import image_markdown, rename_run
from tuneloop.runtime.cpu import pin
from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.curation.store import new_labelled_events
from tuneloop.services.drift.clusters import what_drifted
from tuneloop.services.drift.core import UNIT, DriftReport, detect_drift
from tuneloop.services.drift.embeddings import Embedder, embed_texts
from tuneloop.services.drift.store import (
    NotEnoughEvents,
    Window,
    load_windows,
    report_history,
    save_report,
)
from tuneloop.services.loop import metrics as loop_metrics
from tuneloop.services.store.database import Store

DRIFT_EVENT = "tuneloop.drift.detected"
LABELS_EVENT = "tuneloop.labels.accumulated"


@task(retries=2, retry_delay_seconds=5)
def load_windows_task(settings: Settings) -> tuple[Window, Window] | str:
    """Both windows, or why there is nothing to compare yet."""
    store = Store(settings.db_path, settings.store.lock_timeout_s)
    with store.connect() as con:
        try:
            return load_windows(con, settings.drift)
        except NotEnoughEvents as exc:
            return str(exc)


@task(retries=1)
def embed_task(settings: Settings, ref: Window, cur: Window) -> Any:
    pin(settings.training.cpu_cores)
    store = Store(settings.db_path, settings.store.lock_timeout_s)
    vectors, _ = embed_texts(store, Embedder(settings.embeddings), ref.texts + cur.texts)
    return vectors


@task
def test_task(settings: Settings, ref: Window, cur: Window, vectors: Any) -> DriftReport:
    ref_vec, cur_vec = vectors[: len(ref)], vectors[len(ref) :]
    report = detect_drift(ref_vec, cur_vec, settings.drift)
    report.reference_desc, report.current_desc = ref.desc, cur.desc
    changes = what_drifted(ref_vec, cur_vec, cur.texts, settings.drift, cur.labels, ref.labels)
    report.clusters = [change.to_dict() for change in changes]
    return report


@task(retries=2, retry_delay_seconds=5)
def save_task(settings: Settings, report: DriftReport) -> str:
    store = Store(settings.db_path, settings.store.lock_timeout_s)
    with store.connect() as con:
        return save_report(con, report)


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


@task(retries=2, retry_delay_seconds=5)
def count_new_labels(settings: Settings) -> int:
    return new_labelled_events(Store(settings.db_path, settings.store.lock_timeout_s))


@task
def emit_labels(count: int, threshold: int) -> str | None:
    event = emit_event(LABELS_EVENT, resource={"prefect.resource.id": "tuneloop.feedback"},
                       payload={"new_labels": count, "threshold": threshold})
    return str(event.id) if event else None


@task
def report_artifact(settings: Settings, report_id: str, report: DriftReport) -> None:
    from tuneloop.services.drift.plots import plot_drift_history

    with Store(settings.db_path, settings.store.lock_timeout_s).connect() as con:
        rows = report_history(con)
    plot = None
    if len(rows) >= 1:
        plot = plot_drift_history(rows, settings.home / "reports" / "drift-history.png")
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
def detect_drift_flow(settings: Settings | None = None) -> dict[str, Any]:
    """Compare the current window with the reference; persist the report; emit on drift."""
    settings = settings or load_settings()
    windows = load_windows_task(settings)
    if isinstance(windows, str):
        rename_run("drift: waiting for events")
        get_run_logger().info("no drift check yet: %s", windows)
        return {"report_id": None, "drifted": False, "waiting": windows}
    ref, cur = windows
    vectors = embed_task(settings, ref, cur)
    report = test_task(settings, ref, cur, vectors)
    report_id = save_task(settings, report)
    report_artifact(settings, report_id, report)
    loop_metrics.record(settings.home, "drift", score=report.score, drifted=report.drifted,
                        p_value=report.p_value, report_id=report_id)
    event_id = emit_task(report_id, report) if report.drifted else None
    labels_event = None
    threshold = settings.loop.retrain_min_new_labels
    new_labels = count_new_labels(settings) if threshold else 0
    if threshold and new_labels >= threshold:
        labels_event = emit_labels(new_labels, threshold)
    get_run_logger().info("drift report %s: %s", report_id, report.summary())
    new = [c["name"] for c in report.clusters if c["status"] in ("new", "grew")]
    rename_run(f"drift: {'DRIFT' if report.drifted else 'no drift'} "
               f"(novel share {report.score:.2f})"
               + (f"; new: {', '.join(new[:3])}" if report.drifted and new else ""))
    return {
        "report_id": report_id, "drifted": report.drifted, "score": report.score,
        "p_value": report.p_value, "event_id": event_id, "summary": report.summary(),
        "reference": report.reference_desc, "current": report.current_desc,
        "clusters": report.clusters, "new_labels": new_labels, "labels_event_id": labels_event,
    }
