"""``tuneloop deadletters list | replay``: what ingest refused, and sending it back after a fix."""

from __future__ import annotations

from datetime import UTC, datetime

import typer
from rich.table import Table

from tuneloop.cli.common import console, fail, settings_of
from tuneloop.services.feedback.producer import FeedbackProducer
from tuneloop.services.ingest.dead_letters import find_dead_letters, mark_replayed, replay_plan
from tuneloop.services.store.database import Store

group = typer.Typer(help="Dead letters: the records ingest refused, each with its reason.",
                    no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="deadletters")


@group.command("list")
def list_dead_letters(
    ctx: typer.Context,
    reason: str | None = typer.Option(None, "--reason", help="Only reasons containing this."),
    limit: int = typer.Option(50, "--limit", min=1),
) -> None:
    """The newest dead letters: id, when, size, whether replayed, and why."""
    with Store.of(settings_of(ctx)).connect() as con:
        rows = find_dead_letters(con, reason=reason, limit=limit)
    if not rows:
        console.print("no dead letters" + (f" with {reason!r} in their reason" if reason else ""))
        return
    table = Table("dead letter", "received", "bytes", "replayed", "reason", box=None)
    for row in rows:
        size = f"{row.size:,}" + (" (cut)" if row.truncated else "") if row.size else "-"
        replayed = f"{row.replayed_at:%m-%d %H:%M}" if row.replayed_at else "-"
        table.add_row(row.dead_letter_id, f"{row.received_at:%Y-%m-%d %H:%M:%S}", size,
                      replayed, row.reason[:120])
    console.print(table)


@group.command("replay")
def replay_dead_letters(
    ctx: typer.Context,
    ids: list[str] = typer.Argument(None, help="Dead letter ids (from `deadletters list`)."),
    reason: str | None = typer.Option(None, "--reason", help="Every dead letter whose reason "
                                      "contains this, instead of ids."),
    again: bool = typer.Option(False, "--again", help="Also those replayed before."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be sent; send nothing."),
) -> None:
    """Send chosen dead letters back to the feedback topic after a fix.

    A fix is an upgrade that reads them, or a producer's key corrected. Only those the
    contract now accepts are sent, keyed by their event id: a replay twice lands each
    event once.
    """
    settings = settings_of(ctx)
    if not ids and not reason:
        raise fail("name dead letters by id, or choose them with --reason TEXT")
    store = Store.of(settings)
    with store.connect() as con:
        rows = find_dead_letters(con, ids=ids or (), reason=reason, limit=100_000)
    missing = sorted(set(ids or ()) - {r.dead_letter_id for r in rows})
    if missing:
        raise fail(f"no such dead letter: {', '.join(missing)}")
    plan = replay_plan(rows, settings.kafka.topic, settings.ingest.max_event_bytes, again)
    for dead_letter_id, why in plan.skip:
        console.print(f"[yellow]left[/] {dead_letter_id}: {why}")
    if dry_run or not plan.send:
        console.print(f"{len(plan.send)} would be sent" if dry_run else "nothing to send")
        return
    with FeedbackProducer(settings) as producer:
        producer.send_many([payload for _, _, payload in plan.send])
        report = producer.flush()
    with store.connect() as con:
        mark_replayed(con, [d for d, _, _ in plan.send], datetime.now(UTC))
    console.print(f"[green]sent back[/] {len(plan.send)} to {settings.kafka.topic}"
                  + ("" if report.complete else f"; {report.pending} wait in the outbox"))
