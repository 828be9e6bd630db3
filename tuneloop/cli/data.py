"""Data commands: ``tuneloop drift``, ``tuneloop curate`` and ``tuneloop golden``."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import typer
from rich.table import Table

from tuneloop.cli.common import console, fail, settings_of
from tuneloop.services.curation import golden
from tuneloop.services.curation.datasets import FORMATS, export_jsonl
from tuneloop.services.curation.store import load_candidates
from tuneloop.services.drift.store import report_history
from tuneloop.services.store.database import Store

golden_app = typer.Typer(help="The pinned golden set: never trained on, used for every check.")


def register(app: typer.Typer) -> None:
    """Add this area's commands to ``app``."""
    app.command("drift")(drift)
    app.command("curate")(curate)
    app.add_typer(golden_app, name="golden")


def drift(
    ctx: typer.Context,
    events: int | None = typer.Option(None, "--events", help="Current window: last N events."),
    minutes: int | None = typer.Option(None, "--minutes", help="Current window: last T minutes."),
    reference_start: datetime | None = typer.Option(None, "--reference-start"),
    reference_end: datetime | None = typer.Option(None, "--reference-end"),
    plot: Path | None = typer.Option(
        None, "--plot", help="Write the novel share over time to this PNG instead of checking."
    ),
) -> None:
    """Compare the current window with the reference and store a drift report."""
    if plot is not None:
        from tuneloop.services.drift.plots import plot_drift_history

        with Store.of(settings_of(ctx)).connect() as con:
            rows = report_history(con)
        try:
            path = plot_drift_history(rows, plot)
        except ValueError as exc:
            raise fail(str(exc)) from None
        console.print(f"drift history ({len(rows)} reports) written to {path}")
        return
    from tuneloop.flows.drift import detect_drift_flow

    window = {"drift.current_window_events": events, "drift.current_window_minutes": minutes,
              "drift.reference_start": reference_start and reference_start.isoformat(),
              "drift.reference_end": reference_end and reference_end.isoformat()}
    try:
        with console.status("embedding and testing the windows..."):
            result = detect_drift_flow(
                overrides={k: v for k, v in window.items() if v is not None})
    except ValueError as exc:  # a bad window (e.g. a reference start without an end)
        raise fail(str(exc)) from None
    if result.get("waiting"):
        raise fail(result["waiting"])
    colour = "red" if result["drifted"] else "green"
    console.print(f"[bold {colour}]{result['summary']}[/]")
    console.print(f"report {result['report_id']}: reference = {result['reference']}, "
                  f"current = {result['current']}")
    for c in result["clusters"]:
        labels = ", ".join(f"{lab['label']} ({lab['current']} vs {lab['reference']})"
                           for lab in c["labels"])
        console.print(
            f"[bold]{c['status']}[/] {c['name']}: {c['size']} events, {c['share']:.1%} of "
            f"current vs {c['reference_share']:.1%} of reference" + (f"; labels {labels}" if labels
                                                                     else "")
        )
        for example in c["examples"]:
            console.print(f"    · {example}", highlight=False)


def curate(
    ctx: typer.Context,
    export: Path | None = typer.Option(None, "--export", help="Folder for the JSONL exports."),
    include_used: bool = typer.Option(
        False, "--include-used", help="Also consider events an earlier version holds."
    ),
) -> None:
    """Curate a new immutable dataset version from feedback, and export it as JSONL."""
    from tuneloop.flows.curate import curate_flow

    try:
        with console.status("curating (embedding the prompts)..."):
            result = curate_flow(include_used=include_used,
                                 export_dir=str(export) if export else None)
    except ValueError as exc:
        raise fail(str(exc)) from None
    report = result["report"]
    console.print(f"[bold]dataset {result['version']}[/] (hash {result['content_hash'][:12]}, "
                  f"parents {result['parents'] or 'none'})")
    console.print(f"considered {report['considered']}, kept {report['kept']}, "
                  f"replayed {report['replayed']}, splits {report['splits']}")
    table = Table("dropped because", "events")
    for reason, n in report["dropped"].items():
        table.add_row(reason, str(n))
    console.print(table)
    for export_ in result["exports"].values():
        console.print(f"{export_['path']}: [green]valid[/] ({export_['check']})")


@golden_app.command("add")
def golden_add(
    ctx: typer.Context,
    count: int = typer.Option(300, "--count", help="Examples to pick from labelled feedback."),
    file: Path | None = typer.Option(None, "--file", help="Add a reviewed chat JSONL instead."),
) -> None:
    """Pin examples into the golden set (from labelled feedback, or a JSONL file)."""
    settings = settings_of(ctx)
    store = Store.of(settings)
    with store.connect() as con:
        if file is not None:
            try:
                examples = golden.from_jsonl(file, settings.task)
            except (ValueError, OSError) as exc:
                raise fail(str(exc)) from None
        else:
            examples = golden.pick(load_candidates(con), count, settings.curation.seed,
                                   settings.task)
        try:
            added = golden.add(con, examples, settings.curation.golden_max)
        except golden.GoldenSetFull as exc:
            raise fail(str(exc)) from None
        total = len(golden.load(con))
    console.print(f"golden set: added {added}, now {total}")
    if file is not None and added < len(examples):
        console.print(f"[yellow]{len(examples) - added} of {len(examples)} prompts were already "
                      "golden (or repeated in the file) and were skipped: to replace one, "
                      "`tuneloop golden remove` it first[/]")
    _aim(total, settings.curation.golden_min)


@golden_app.command("remove")
def golden_remove(
    ctx: typer.Context,
    keys: list[str] | None = typer.Argument(
        None, help="Example ids (as `tuneloop golden list` shows them) or prompts."),
    invalid: bool = typer.Option(
        False, "--invalid", help="Remove every reference the alias's task cannot judge (for a "
        "json task: a reference that is not a JSON object)."),
) -> None:
    """Remove examples from the golden set (to replace them, or references the task cannot
    judge)."""
    if not keys and not invalid:
        raise fail("name the examples to remove (ids or prompts), or pass --invalid")
    settings = settings_of(ctx)
    with Store.of(settings).connect() as con:
        examples = golden.load(con)
        named, unmatched = golden.matching(examples, keys or [])
        if unmatched:
            raise fail(f"no golden example has the id or prompt {', '.join(map(repr, unmatched))}"
                       " (see `tuneloop golden list`); nothing removed")
        if invalid:
            judged, _ = golden.judgeable(examples, settings.task)
            kept = {ex.example_id for ex in judged}
            named += [ex for ex in examples if ex.example_id not in kept]
        removed = golden.remove(con, [ex.example_id for ex in named])
        total = len(golden.load(con))
    console.print(f"golden set: removed {removed}, now {total}")
    if invalid and not keys and not removed:
        console.print(f"every golden reference is one a {settings.task.kind} task can judge")
    _aim(total, settings.curation.golden_min)


def _aim(total: int, golden_min: int) -> None:
    if total < golden_min:
        console.print(f"[yellow]the golden set has {total} examples; aim for at least "
                      f"{golden_min} (`tuneloop golden add`)[/]")


@golden_app.command("list")
def golden_list(
    ctx: typer.Context, limit: int = typer.Option(20, "--limit", help="Rows to show.")
) -> None:
    """Show the golden set."""
    settings = settings_of(ctx)
    with Store.of(settings).connect() as con:
        examples = golden.load(con)
    table = Table("id", "label", "prompt", "answer", title=f"golden set: {len(examples)} examples")
    for ex in examples[:limit]:
        table.add_row(ex.example_id, ex.label or "", ex.prompt[:80], ex.completion[:40])
    console.print(table)


@golden_app.command("export")
def golden_export(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="JSONL file to write."),
    fmt: str = typer.Option("chat", "--format", help="chat or completion."),
) -> None:
    """Export the golden set as JSONL for review or evaluation."""
    settings = settings_of(ctx)
    with Store.of(settings).connect() as con:
        examples = golden.load(con)
    if fmt not in FORMATS:
        raise fail(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    export_jsonl(examples, path, fmt)
    console.print(json.dumps({"path": str(path), "examples": len(examples)}))
