"""The demo's report: one self-contained HTML page (plots inline) of what the loop did."""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tuneloop.runtime.settings import Settings
from tuneloop.services.store.database import Store


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).exists():
        return f"<p><em>{html.escape(alt)}: not available</em></p>"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def write_report(settings: Settings, result: dict[str, Any]) -> Path:
    """Write ``<home>/reports/demo.html`` from the demo's result; returns its path."""
    from tuneloop.services.canary.store import list_decisions
    from tuneloop.services.curation.plots import plot_curation
    from tuneloop.services.demo.plots import plot_before_after
    from tuneloop.services.drift.plots import plot_drift_history
    from tuneloop.services.drift.store import report_history
    from tuneloop.training.pipeline import run_dir_for

    reports = Path(settings.home) / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    promoted = result.get("promoted_version")
    with Store(settings.db_path, 120).connect() as con:
        history = report_history(con)
        decisions = list_decisions(con, 200)
        adapter = con.execute("SELECT dataset_version, run_key FROM adapters WHERE version = ?",
                              [promoted]).fetchall() if promoted else []
        dataset_report: dict[str, Any] = {}
        if adapter:
            raw = con.execute("SELECT report FROM datasets WHERE version = ?",
                              [adapter[0][0]]).fetchall()
            if raw:
                dataset_report = json.loads(raw[0][0]) if isinstance(raw[0][0], str) \
                    else dict(raw[0][0])

    marks: dict[str, datetime] = {}
    if result.get("shift_at"):
        marks["traffic shifts"] = datetime.fromisoformat(result["shift_at"])
    if result.get("promoted_at"):
        marks[f"{promoted} promoted"] = datetime.fromisoformat(result["promoted_at"])
    drift_png = plot_drift_history(history, reports / "demo-drift.png", marks) if history \
        else None
    curation_png = plot_curation(dataset_report, f"curation of {adapter[0][0]}",
                                 reports / "demo-curation.png") if dataset_report and adapter \
        else None
    curve = run_dir_for(settings, adapter[0][1]) / "training_curve.png" \
        if adapter and adapter[0][1] else None
    live = next((d for d in decisions if d["candidate"] == promoted and d["stage"] == "live"
                 and d["verdict"] == "promote"), None)
    offline = next((d for d in decisions if d["candidate"] == promoted
                    and d["stage"] == "offline"), None)
    canary_png = reports / f"canary-{live['decision_id']}.png" if live else None
    groups = {f"{g}, {when}": scores for when in ("before", "after")
              for g, scores in (result.get(when) or {}).items()}
    scores_png = plot_before_after(groups, "held-out queries through the alias",
                                   reports / "demo-scores.png") if groups else None

    before, after = result.get("before") or {}, result.get("after") or {}
    new_after = after.get("new intents", {}).get("macro_f1", 0.0)
    delta = 100 * (after.get("old intents", {}).get("macro_f1", 0.0)
                   - before.get("old intents", {}).get("macro_f1", 0.0))
    shift_s = result.get("shift_to_promotion_s")
    goals = [
        ["new-intent macro-F1 after", f"{new_after:.3f}", ">= 0.70 (stretch 0.85)",
         "met" if new_after >= 0.70 else "MISSED"],
        ["old-intent macro-F1 change (points)", f"{delta:+.1f}" + (
            " (95% interval {:+.1f} to {:+.1f}, {} queries)".format(
                *result["old_intents_delta"]["ci95"], result["old_intents_delta"]["queries"])
            if result.get("old_intents_delta") else ""), ">= -2.0",
         "met" if delta >= -2.0 else "MISSED"],
        ["shift onset to promotion (s)", "-" if shift_s is None else f"{shift_s:.0f}", "<= 1200",
         "met" if shift_s is not None and shift_s <= 1200 else "MISSED"],
        ["steady traffic: drift alarms / retrains",
         f"{result.get('steady_drift_alarms', 0)} / {result.get('steady_retrains', 0)}", "0 / 0",
         "met" if not (result.get("steady_drift_alarms") or result.get("steady_retrains"))
         else "MISSED"],
    ]
    clusters = [[c["name"], c["status"], c["size"], f"{c['share']:.1%}",
                 f"{c['reference_share']:.1%}",
                 ", ".join(f"{lab['label']} ({lab['current']})" for lab in c.get("labels", []))]
                for c in result.get("drift_clusters") or []]
    decision_rows = [[f"{d['created_at']:%H:%M:%S}", d["stage"], d["candidate"] or "-",
                      d["verdict"], d["reason"][:200]] for d in reversed(decisions)]
    parts = [
        "<h1>tuneloop demo: the loop, unattended</h1>",
        f"<p>data: {html.escape(result['dataset'])}; {len(result['old_intents'])} intents "
        f"before the shift, {len(result['new_intents'])} new after it "
        f"({html.escape(', '.join(result['new_intents']))}). First adapter "
        f"<b>{result.get('bootstrap_version')}</b>; promoted after the shift "
        f"<b>{promoted or 'nothing'}</b>.</p>",
        "<h2>goals</h2>", _table(["goal", "measured", "target", ""], goals),
        "<h2>accuracy and macro-F1 on held-out queries, through the gateway alias</h2>",
        _img(scores_png, "before and after"),
        _table(["group", "when", "accuracy", "macro-F1"],
               [[g, w, f"{s['accuracy']:.3f}", f"{s['macro_f1']:.3f}"]
                for w, res in (("before", before), ("after", after)) for g, s in res.items()]),
        "<h2>drift score over time</h2>", _img(drift_png, "drift history"),
        "<h3>what the first drift alarm after the shift found</h3>",
        f"<p>new intents named: {html.escape(', '.join(result.get('named_new_intents') or []))}"
        "</p>",
        _table(["cluster", "status", "events", "share now", "share before", "labels"], clusters),
        "<h2>curation of the retrain's dataset</h2>", _img(curation_png, "curation"),
        "<h2>training curve</h2>", _img(curve, "training curve"),
        "<h2>canary comparison</h2>",
        f"<p>{html.escape(offline['reason'][:400]) if offline else ''}</p>",
        f"<p>{html.escape(live['reason'][:400]) if live else ''}</p>",
        _img(canary_png, "canary comparison"),
        "<h2>every decision</h2>",
        _table(["time", "stage", "candidate", "verdict", "reason"], decision_rows),
        f"<p>timings: {html.escape(json.dumps(result.get('timings', {})))}</p>",
    ]
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%}")
    path = reports / "demo.html"
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>tuneloop demo"
                    f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return path
