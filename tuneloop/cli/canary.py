"""``tuneloop canary``, ``tuneloop freeze`` and ``tuneloop decisions``."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from tuneloop.cli.common import console, fail, settings_of
from tuneloop.services.store.database import Store

canary_app = typer.Typer(help="Gate a candidate adapter offline and live; roll back by hand.",
                         no_args_is_help=True)
freeze_app = typer.Typer(help="Deployment freeze: while active, nothing is promoted.",
                         no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(canary_app, name="canary")
    app.add_typer(freeze_app, name="freeze")
    app.command("decisions")(decisions)


@canary_app.command("run")
def run_cmd(
    ctx: typer.Context,
    version: str | None = typer.Argument(None, help="Candidate; default: the newest one."),
    window_s: float | None = typer.Option(None, "--window-s", help="canary.window_s."),
    share: float | None = typer.Option(None, "--share", help="serving.canary_share."),
) -> None:
    """Run the canary flow: offline gate, live window, then promote or roll back."""
    from pydantic import ValidationError

    from tuneloop.flows.canary import canary
    from tuneloop.runtime.settings import SettingsError, load_settings

    base = settings_of(ctx)
    # A longer window than the maximum raises the maximum with it.
    longest = max(window_s, base.canary.max_window_s) if window_s else None
    overrides = {name: value for name, value in (
        ("canary.window_s", window_s), ("canary.max_window_s", longest),
        ("serving.canary_share", share)) if value is not None}
    try:
        load_settings(overrides)  # a bad value fails here, before a flow run starts
    except (ValidationError, SettingsError) as exc:
        raise fail(f"invalid settings:\n{exc}") from None
    try:
        result = canary(version, overrides=overrides or None)
    except ValueError as exc:
        raise fail(str(exc)) from None
    colour = {"promote": "green", "reject": "red", "rollback": "red"}.get(result["verdict"],
                                                                          "yellow")
    console.print(f"[bold]{result['candidate']}[/]: [{colour}]{result['verdict']}[/]")
    console.print(result.get("reason", ""))


@canary_app.command("rollback")
def rollback_cmd(
    ctx: typer.Context,
    reason: str = typer.Option(..., "--reason", help="Why; recorded in deployments."),
    to: str | None = typer.Option(None, "--to", help="Retired version to restore."),
) -> None:
    """Take the live canary off traffic; with none, roll production back to the last version.

    Recorded as a decision (stage ``manual``) and counted in the loop's metrics, as the
    canary flow's own verdicts are.
    """
    from tuneloop.cli.training import _change
    from tuneloop.serving.canary.manual import rollback_by_hand

    settings = settings_of(ctx)
    _change(lambda: rollback_by_hand(settings, reason, to).transitions)


@canary_app.command("check")
def check_cmd(ctx: typer.Context) -> None:
    """Evaluate production on the golden set now; freeze promotions if it fell too far."""
    from tuneloop.flows.canary import check_production

    result = check_production()
    console.print(f"production check: [bold]{result['verdict']}[/]: {result['reason']}")


@freeze_app.command("show")
def freeze_show(ctx: typer.Context) -> None:
    """Whether promotions are frozen, since when and why."""
    from tuneloop.services.canary.store import active_freeze

    with Store.of(settings_of(ctx)).connect() as con:
        active = active_freeze(con)
    if active is None:
        console.print("no freeze: promotions are allowed")
    else:
        console.print(f"[red]FROZEN[/] since {active['created_at']:%Y-%m-%d %H:%M:%S}: "
                      f"{active['reason']}")


@freeze_app.command("set")
def freeze_set(ctx: typer.Context,
               reason: str = typer.Option(..., "--reason", help="Why promotions stop.")) -> None:
    """Stop promotions until a person lifts the freeze."""
    from tuneloop.services.canary.store import freeze

    try:
        with Store.of(settings_of(ctx)).connect() as con:
            freeze(con, reason, {"by": "cli"})
    except ValueError as exc:
        raise fail(str(exc)) from None
    console.print("[red]frozen[/]: no promotion until `tuneloop freeze lift --reason ...`")


@freeze_app.command("lift")
def freeze_lift(ctx: typer.Context,
                reason: str = typer.Option(..., "--reason", help="Why it is safe again.")) -> None:
    """Lift the freeze: promotions resume."""
    from tuneloop.services.canary.store import lift

    try:
        with Store.of(settings_of(ctx)).connect() as con:
            lifted = lift(con, reason)
    except ValueError as exc:
        raise fail(str(exc)) from None
    console.print(f"lifted {lifted} freeze(s)" if lifted else "no freeze was active")


def decisions(
    ctx: typer.Context,
    limit: int = typer.Option(20, "--limit", "-n"),
    candidate: str | None = typer.Option(None, "--candidate", help="Only this version."),
    as_json: bool = typer.Option(False, "--json", help="Every check and figure, as JSON."),
) -> None:
    """Every decision of the loop, newest first: retrains (started, skipped, trained,
    failed), the canary's gates with the tests that made them, freezes, manual moves."""
    from tuneloop.services.canary.store import list_decisions

    with Store.of(settings_of(ctx)).connect() as con:
        rows = list_decisions(con, limit, candidate)
    if as_json:
        console.print_json(json.dumps(rows, default=str))
        return
    table = Table(title="decisions")
    for col in ("when", "stage", "candidate", "incumbent", "verdict", "why"):
        table.add_column(col)
    for r in rows:
        table.add_row(f"{r['created_at']:%m-%d %H:%M:%S}", r["stage"], r["candidate"] or "-",
                      r["incumbent"] or "base", _verdict(r["verdict"]), _checks(r["checks"]))
    console.print(table)


def _verdict(verdict: str) -> str:
    colour = {"promote": "green", "pass": "green", "ok": "green", "trained": "cyan",
              "reject": "red", "rollback": "red", "frozen": "red", "failed": "red"}.get(
        verdict, "yellow")
    return f"[{colour}]{verdict}[/]"


def _checks(checks: list[dict[str, Any]]) -> str:
    shown = [c for c in checks if c["outcome"] in ("fail", "hold")] or \
        [c for c in checks if c["outcome"] == "pass"]
    parts = []
    for c in shown[:3]:
        p = "" if c["p_value"] is None else f", p={c['p_value']:.3g}"
        parts.append(f"{c['name']}: {c['outcome']}{p}")
    if not parts:  # a retrain's record: what started it, what it did or why it did not
        parts = [f"{c['name']}: {str(c['detail'])[:90]}" for c in checks
                 if c["outcome"] == "info"][:3]
    return "\n".join(parts) or "-"
