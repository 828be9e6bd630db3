"""``tuneloop demo``: the loop on the embedded stack, start to finish, with banking77 traffic."""

from __future__ import annotations

import typer
from rich.rule import Rule

from tuneloop.cli.common import console, settings_of


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    ctx: typer.Context,
    events: int = typer.Option(3000, "--events", help="banking77 feedback events to replay."),
) -> None:
    """Bring the stack up, replay banking77 feedback, ingest it, and show status."""
    from infra.stack import Stack
    from tuneloop.cli import feedback, stack

    settings = settings_of(ctx)
    console.print(Rule("1. embedded stack: tansu broker, Prefect server, ingest worker"))
    with console.status("starting..."):
        Stack(settings).up()
    console.print(f"Prefect UI: {settings.prefect.api_url.removesuffix('/api')}")

    console.print(Rule(f"2. production traffic: {events:,} banking77 feedback events"))
    ctx.invoke(feedback.replay, ctx=ctx, dataset="banking77", rate=0, intents=None, limit=events,
               split="train", accuracy=0.7, seed=0, pii_share=0.02)

    console.print(Rule("3. ingest flow: validate, redact, DuckDB, commit offsets"))
    ctx.invoke(feedback.ingest, ctx=ctx, follow=False, max_batches=None)

    console.print(Rule("status"))
    stack.render_status(stack.collect_status(settings))
