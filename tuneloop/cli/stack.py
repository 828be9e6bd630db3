"""``tuneloop up / down / worker``: the embedded stack (``status`` lives in cli/status.py)."""

from __future__ import annotations

import typer

from tuneloop.cli.common import console, fail, settings_of
from tuneloop.cli.status import status, topic_problems


def register(app: typer.Typer) -> None:
    """Add the stack's commands to ``app``."""
    app.command("up")(up)
    app.command("down")(down)
    app.command("status")(status)
    app.command("worker", hidden=True)(worker)
    app.command("supervise", hidden=True)(supervise)


def up(
    ctx: typer.Context,
    no_worker: bool = typer.Option(False, "--no-worker", help="Skip the deployment worker."),
    no_serving: bool = typer.Option(False, "--no-serving", help="Skip the gateway and vLLM."),
    no_ingest: bool = typer.Option(False, "--no-ingest", help="Skip the long-running ingest."),
) -> None:
    """Start the broker, Prefect server (UI on :4200), worker, ingest, and the gateway with vLLM."""
    from tuneloop.infra.stack import Stack

    settings = settings_of(ctx)
    with console.status("starting the embedded stack (vLLM takes about a minute)..."):
        try:
            Stack(settings).up(worker=not no_worker, serving=not no_serving,
                               ingest=not no_ingest)
        except (TimeoutError, OSError) as exc:
            raise fail(str(exc)) from None
    for problem in topic_problems(settings):
        console.print(f"[yellow]warning[/]: {problem}")
    console.print(f"[green]up[/]: Kafka at {settings.kafka.bootstrap_servers}, "
                  f"Prefect UI at {settings.prefect.api_url.removesuffix('/api')}"
                  + ("" if no_serving or not settings.serving.embedded else
                     f", OpenAI-compatible endpoint at {settings.serving.gateway_url}/v1 "
                     f"(model {settings.serving.alias!r})"))


def down(ctx: typer.Context) -> None:
    """Stop the embedded stack. On memory storage (the default) the broker's messages go
    with it; with kafka.storage_engine = s3://... they stay in the object store."""
    from tuneloop.infra.stack import Stack

    stopped = Stack(settings_of(ctx)).down()
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


def worker(ctx: typer.Context) -> None:
    """Serve the deployments (run by ``tuneloop up``)."""
    from tuneloop.flows.serve import serve_all

    serve_all(settings_of(ctx))


SUPERVISED = {"ingest": ("ingest", "--follow"), "gateway": ("gateway",), "worker": ("worker",)}
# The worker's flow runs are its child processes: they go with it (see infra.supervisor).
OWN_GROUP = {"worker"}


def supervise(ctx: typer.Context,
              name: str = typer.Argument(..., help="ingest, gateway or worker")) -> None:
    """Run a component and restart it when it dies (run by ``tuneloop up``)."""
    import sys

    from tuneloop.infra.supervisor import supervise as run_supervised

    if name not in SUPERVISED:
        raise fail(f"nothing called {name!r} to supervise; choose from {', '.join(SUPERVISED)}")
    settings = settings_of(ctx)
    run_supervised(name, [sys.executable, "-m", "tuneloop.cli.main", *SUPERVISED[name]],
                   settings.home, own_group=name in OWN_GROUP)
