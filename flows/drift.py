"""The ``detect_drift`` flow: windows -> embeddings -> tests -> report -> event.

On drift it emits the Prefect event ``tuneloop.drift.detected`` (resource
``tuneloop.drift-report.<report id>``), which a deployment trigger can turn into
a retrain run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.events import emit_event

from services.clusters import what_drifted
from services.drift import DriftReport, detect_drift
from services.drift_store import Window, load_windows, save_report
from services.embeddings import Embedder, embed_texts
from services.settings import Settings, load_settings
from services.store import Store

DRIFT_EVENT = "tuneloop.drift.detected"


@task(retries=2, retry_delay_seconds=5)
def load_windows_task(settings: Settings) -> tuple[Window, Window]:
    store = Store(settings.db_path, settings.store.lock_timeout_s)
    with store.connect() as con:
        return load_windows(con, settings.drift)


@task(retries=1)
def embed_task(settings: Settings, ref: Window, cur: Window) -> Any:
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
            "p_value": report.p_value,
            "reference": report.reference_desc,
            "current": report.current_desc,
            "clusters": [
                {"name": c["name"], "status": c["status"], "size": c["size"]}
                for c in report.clusters
            ],
        },
    )
    return str(event.id) if event else None


@flow(name="detect_drift")
def detect_drift_flow(settings: Settings | None = None) -> dict[str, Any]:
    """Compare the current window with the reference; persist the report; emit on drift."""
    settings = settings or load_settings()
    ref, cur = load_windows_task(settings)
    vectors = embed_task(settings, ref, cur)
    report = test_task(settings, ref, cur, vectors)
    report_id = save_task(settings, report)
    event_id = emit_task(report_id, report) if report.drifted else None
    get_run_logger().info("drift report %s: %s", report_id, report.summary())
    return {
        "report_id": report_id, "drifted": report.drifted, "score": report.score,
        "p_value": report.p_value, "event_id": event_id,
    }
