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
    split: bool = typer.Option(
        False, "--split", help="Run each role (control worker, training worker, two ingest "
        "workers, the gateway with two vLLM replicas) in a home of its own under "
        "<home>/roles, with no path in common, meeting only through Kafka, Postgres, the "
        "object store and HTTP; the settings need the split's (see tuneloop.infra.split)."),
) -> None:
    """Start the broker, Prefect server (UI on :4200), worker, ingest, and the gateway with vLLM."""
    from tuneloop.infra.stack import Stack

    settings = settings_of(ctx)
    if split:
        from tuneloop.infra.split import Split

        with console.status("starting the services, then each role in its own home..."):
            try:
                Split(settings).up()
            except (TimeoutError, OSError, ValueError, RuntimeError) as exc:
                raise fail(str(exc)) from None
        console.print(f"[green]up, split[/]: roles under {settings.home}/roles, gateway at "
                      f"{settings.serving.gateway_url}/v1")
        return
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
    """Stop the embedded stack. The broker's messages stay in the object store (the
    default, kafka.storage_engine = s3://...); on memory storage they go with it."""
    from tuneloop.infra.split import Split, is_split
    from tuneloop.infra.stack import Stack

    settings = settings_of(ctx)
    if is_split(settings.home):
        stopped = Split(settings).down()
        console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
        return
    stopped = Stack(settings).down()
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
