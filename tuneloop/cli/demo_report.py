"""The demo's report: one self-contained HTML page (plots inline) of what the loop did,
and the terminal summary with its ``FIGURE`` lines.

:func:`write_report` reads what the stores hold about the promotion
(:func:`_read_records`), draws the plots (:func:`_draw_plots`), and lays out one
section a function.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.rule import Rule

from tuneloop.cli.common import console
from tuneloop.runtime.settings import Settings
from tuneloop.services.demo.result import NEW, Result, Scores, goals

if TYPE_CHECKING:
    from tuneloop.services.drift.store import ReportRow
    from tuneloop.services.registry.core import Adapter

STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%}")


@dataclass
class Records:
    """What the stores hold about the run: drift checks, decisions, the promoted adapter."""

    promoted: str | None  # the version the loop promoted after the shift
    drift_history: list[ReportRow] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)  # newest first
    adapter: Adapter | None = None  # the promoted version's registry entry
    dataset_report: dict[str, Any] = field(default_factory=dict)  # curation of its dataset

    def decision(self, stage: str, verdict: str | None = None) -> dict[str, Any] | None:
        """The newest decision of ``stage`` (with ``verdict``) about the promoted adapter."""
        return next((d for d in self.decisions if d["candidate"] == self.promoted
                     and d["stage"] == stage and verdict in (None, d["verdict"])), None)


@dataclass(frozen=True)
class Plots:
    """The report's images; None where there was nothing to draw."""

    scores: Path | None
    drift: Path | None
    curation: Path | None
    training_curve: Path | None
    canary: Path | None


def write_report(settings: Settings, result: Result) -> Path:
    """Write ``<home>/reports/demo.html`` from the demo's result; returns its path.
    Raises ``StoreBusyError`` when the store stays busy for two minutes."""
    reports = Path(settings.home) / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    records = _read_records(settings, result.promoted_version)
    plots = _draw_plots(settings, result, records, reports)
    parts = [*_summary_section(result), *_scores_section(result, plots),
             *_drift_section(result, plots), *_adapter_section(records, plots),
             *_decisions_section(result, records)]
    path = reports / "demo.html"
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>tuneloop demo"
                    f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    return path


def _read_records(settings: Settings, promoted: str | None) -> Records:
    from tuneloop.services.canary.store import list_decisions
    from tuneloop.services.curation.datasets import report_of
    from tuneloop.services.drift.store import report_history
    from tuneloop.services.registry.core import RegistryError
    from tuneloop.services.registry.store import get_adapter
    from tuneloop.services.store.database import Store

    records = Records(promoted)
    with Store.of(settings, 120).connect() as con:
        records.drift_history = report_history(con)
        records.decisions = list_decisions(con, 200)
        try:
            records.adapter = get_adapter(con, promoted) if promoted else None
        except RegistryError:
            records.adapter = None
        if records.adapter and records.adapter.dataset_version:
            records.dataset_report = report_of(con, records.adapter.dataset_version)
    return records


def _draw_plots(settings: Settings, result: Result, records: Records, reports: Path) -> Plots:
    from tuneloop.services.curation.plots import plot_curation
    from tuneloop.services.demo.plots import plot_before_after
    from tuneloop.services.drift.plots import plot_drift_history
    from tuneloop.training.pipeline import run_dir_for

    marks: dict[str, datetime] = {}
    if result.shift_at:
        marks["traffic shifts"] = datetime.fromisoformat(result.shift_at)
    if result.promoted_at:
        marks[f"{result.promoted_version} promoted"] = datetime.fromisoformat(result.promoted_at)
    adapter, live = records.adapter, records.decision("live", "promote")
    groups = {f"{g}, {when}": s for when, scores in (("before", result.before),
                                                    ("after", result.after))
              for g, s in scores.items()}
    return Plots(
        scores=plot_before_after(groups, "held-out queries through the alias",
                                 reports / "demo-scores.png") if groups else None,
        drift=plot_drift_history(records.drift_history, reports / "demo-drift.png", marks)
        if records.drift_history else None,
        curation=plot_curation(records.dataset_report, f"curation of {adapter.dataset_version}",
                               reports / "demo-curation.png")
        if adapter and records.dataset_report else None,
        training_curve=run_dir_for(settings, adapter.run_key) / "training_curve.png"
        if adapter and adapter.run_key else None,
        canary=reports / f"canary-{live['decision_id']}.png" if live else None,
    )


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


def _summary_section(result: Result) -> list[str]:
    goal_rows = [[g.name, g.measured, g.target, "met" if g.met else "MISSED"]
                 for g in goals(result)]
    return [
        "<h1>tuneloop demo: the loop, unattended</h1>",
        f"<p>data: {html.escape(result.dataset)}; {len(result.old_intents)} intents "
        f"before the shift, {len(result.new_intents)} new after it "
        f"({html.escape(', '.join(result.new_intents))}). First adapter "
        f"<b>{result.bootstrap_version}</b>; promoted after the shift "
        f"<b>{result.promoted_version or 'nothing'}</b>.</p>",
        "<h2>goals</h2>", _table(["goal", "measured", "target", ""], goal_rows),
        *([] if result.dpo is None else [
            "<h2>preferences (--dpo)</h2>",
            f"<p>held-out preference pairs ranked right by implicit reward: "
            f"{result.dpo['pair_accuracy_sft']:.3f} after SFT (the promoted adapter), "
            f"{result.dpo['pair_accuracy_dpo']:.3f} after DPO on it "
            f"({result.dpo['pairs_held_out']:.0f} pairs held out, DPO on "
            f"{result.dpo['pairs_train']:.0f})</p>"]),
    ]


def _scores_section(result: Result, plots: Plots) -> list[str]:
    names = sorted({m for scores in (result.before, result.after) for s in scores.values()
                    for m in s})
    rows = [[g, when, *(f"{s.get(m, 0.0):.3f}" for m in names)]
            for when, scores in (("before", result.before), ("after", result.after))
            for g, s in scores.items()]
    deltas = [f"{what}: {d.points:+.1f} points, 95% interval {d.ci95[0]:+.1f} to "
              f"{d.ci95[1]:+.1f} ({d.queries} queries)"
              for what, d in ((f"old groups' {result.headline}", result.old_intents_delta),
                              (f"new groups' {result.headline}", result.new_intents_delta))
              if d is not None]
    return [f"<h2>{html.escape(', '.join(names))} on held-out queries, through the gateway "
            "alias</h2>", _img(plots.scores, "before and after"),
            _table(["group", "when", *names], rows),
            *(f"<p>{html.escape(line)}</p>" for line in deltas)]


def _drift_section(result: Result, plots: Plots) -> list[str]:
    clusters = [[c["name"], c["status"], c["size"], f"{c['share']:.1%}",
                 f"{c['reference_share']:.1%}",
                 ", ".join(f"{lab['label']} ({lab['current']})" for lab in c.get("labels", []))]
                for c in result.drift_clusters]
    return ["<h2>drift score over time</h2>", _img(plots.drift, "drift history"),
            "<h3>what the first drift alarm after the shift found</h3>",
            f"<p>new intents named: {html.escape(', '.join(result.named_new_intents))}</p>",
            _table(["cluster", "status", "events", "share now", "share before", "labels"],
                   clusters)]


def _adapter_section(records: Records, plots: Plots) -> list[str]:
    offline, live = records.decision("offline"), records.decision("live", "promote")
    return ["<h2>curation of the retrain's dataset</h2>", _img(plots.curation, "curation"),
            "<h2>training curve</h2>", _img(plots.training_curve, "training curve"),
            "<h2>canary comparison</h2>",
            f"<p>{html.escape(offline['reason'][:400]) if offline else ''}</p>",
            f"<p>{html.escape(live['reason'][:400]) if live else ''}</p>",
            _img(plots.canary, "canary comparison")]


def _decisions_section(result: Result, records: Records) -> list[str]:
    rows = [[f"{d['created_at']:%H:%M:%S}", d["stage"], d["candidate"] or "-", d["verdict"],
             d["reason"][:200]] for d in reversed(records.decisions)]
    return ["<h2>every decision</h2>",
            _table(["time", "stage", "candidate", "verdict", "reason"], rows),
            f"<p>timings: {html.escape(json.dumps(result.timings))}</p>"]


# ------------------------------------------------------------------ the terminal
def print_scores(when: str, scores: Scores) -> None:
    """One line: the figures of each group ``when`` ("before", "after")."""
    console.print("  " + "; ".join(
        f"{group} {when}: " + ", ".join(f"{name} {value:.3f}" for name, value in s.items())
        for group, s in scores.items()))


def print_summary(settings: Settings, r: Result) -> None:
    """The run in a few lines, its goals met or missed, then the ``FIGURE`` lines."""
    console.print(Rule("summary"))
    noun = "intents" if r.kind == "label" else "groups"
    console.print(f"old {noun} ({len(r.old_intents)}): {', '.join(r.old_intents)}")
    console.print(f"new {noun} ({len(r.new_intents)}): {', '.join(r.new_intents)}")
    console.print(f"first adapter {r.bootstrap_version}; after the shift "
                  f"{r.promoted_version or 'nothing promoted'}"
                  + (f", {r.shift_to_promotion_s:.0f} s from shift to promotion"
                     if r.shift_to_promotion_s is not None else ""))
    console.print(f"the drift report named {len(r.named_new_intents)} of {len(r.new_intents)} "
                  f"new intents: {', '.join(r.named_new_intents) or '-'}")
    print_scores("before", r.before)
    print_scores("after", r.after)
    for which, d in (("old", r.old_intents_delta), ("new", r.new_intents_delta)):
        if d:
            console.print(f"  {which} {'intents' if r.kind == 'label' else 'groups'}' "
                          f"{r.headline} change: {d.points:+.1f} points, 95% interval "
                          f"{d.ci95[0]:+.1f} to {d.ci95[1]:+.1f} ({d.queries} queries)")
    console.print(f"failed user requests: {r.served_failures}")
    if r.missed:
        console.print("[bold red]missed:[/] " + "; ".join(r.missed))
    else:
        console.print("[bold green]every goal met[/]")
    console.print(f"report: {r.report}")
    # The demo's settings file: without it a command would read the user's settings.
    config = Path(settings.home) / "demo.toml"
    cmd = f"TUNELOOP_CONFIG={config} tuneloop --home {settings.home}"
    console.print(f"Prefect UI: {settings.prefect.api_url.removesuffix('/api')}; "
                  f"`{cmd} status`; `{cmd} down` stops the stack.")
    print_figures(r)


def figures(r: Result) -> list[tuple[str, str]]:
    """The run's ``FIGURE`` names and values: for intents macro-F1; for json the new
    groups' field exact match (with the p-value of its gain), their schema-valid rate and
    the old groups' change in points (with its interval); for text the same in chrF."""
    shift = ("shift_to_promotion_s", "nan" if r.shift_to_promotion_s is None
             else f"{r.shift_to_promotion_s:.0f}")
    if r.kind == "label":
        return [("new_intents_macro_f1_before", f"{r.f1('before', NEW):.3f}"),
                ("new_intents_macro_f1_after", f"{r.f1('after', NEW):.3f}"),
                ("old_intents_macro_f1_delta", f"{r.old_change_points:.1f}"), shift]
    metric, gain, old = r.headline, r.new_intents_delta, r.old_intents_delta
    out = [(f"new_{metric}_before", f"{r.f1('before', NEW):.3f}"),
           (f"new_{metric}_after", f"{r.f1('after', NEW):.3f}"),
           (f"new_{metric}_p", "nan" if gain is None or gain.p_not_better is None
            else f"{gain.p_not_better:.4f}")]
    if r.kind == "json":
        out.append(("schema_valid_after", f"{r.metric('after', NEW, 'schema_valid'):.3f}"))
    # The change in points as the paired bootstrap read it (the same as after minus before).
    out += [(f"old_{metric}_delta", f"{r.old_change_points:.1f}"),
            (f"old_{metric}_delta_low", "nan" if old is None else f"{old.ci95[0]:.1f}"),
            (f"old_{metric}_delta_high", "nan" if old is None else f"{old.ci95[1]:.1f}"), shift]
    return out


def print_figures(r: Result) -> None:
    """The ``FIGURE name=value`` lines scripts read, on stdout as plain text; with
    ``--dpo``, the held-out pairs' ranking accuracy after SFT and after DPO as well."""
    dpo = [] if r.dpo is None else [
        ("dpo_pair_accuracy_sft", f"{r.dpo['pair_accuracy_sft']:.3f}"),
        ("dpo_pair_accuracy_dpo", f"{r.dpo['pair_accuracy_dpo']:.3f}"),
        ("dpo_held_out_pairs", f"{r.dpo['pairs_held_out']:.0f}")]
    for name, value in figures(r) + dpo:
        print(f"FIGURE {name}={value}")  # noqa: T201
