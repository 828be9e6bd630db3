"""``tuneloop up / down / status / worker``: the embedded stack and what it holds."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.panel import Panel
from rich.table import Table

from tuneloop.cli.common import console, fail, settings_of
from tuneloop.runtime.settings import Settings
from tuneloop.services.store.database import Store, StoreBusyError

STORE_WAIT_S = 3.0


def register(app: typer.Typer) -> None:
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


def topic_problems(settings: Settings) -> list[str]:
    """Topics of an external cluster below the configured replication (the embedded
    broker is one node: nothing to report)."""
    if settings.kafka.embedded:
        return []
    from kafka.errors import KafkaError

    from tuneloop.services.feedback.topics import under_replicated

    try:
        return under_replicated(settings.kafka, (settings.serving.shadow_topic,))
    except KafkaError as exc:
        return [f"could not check the topics' replication: {exc}"]


def down(ctx: typer.Context) -> None:
    """Stop the embedded stack. The embedded broker keeps messages in memory: they go with it."""
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


def status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Health of each component, topic offsets and lag, row counts, dead letters."""
    settings = settings_of(ctx)
    report = collect_status(settings)
    if as_json:
        console.print_json(json.dumps(report, default=str))
    else:
        render_status(report)
    down = [h["component"] for h in report["health"] if not h["ok"]]
    if down:
        raise typer.Exit(1)


def collect_status(settings: Settings) -> dict[str, Any]:
    from kafka.errors import KafkaError

    from tuneloop.infra.stack import Stack
    from tuneloop.services.feedback.topics import topic_offsets

    stack = Stack(settings)
    health = [h.__dict__ for h in stack.health()]
    topics: list[dict[str, Any]] = []
    if health[0]["ok"]:
        for topic, group in ((settings.kafka.topic, settings.kafka.group_id),
                             (settings.kafka.dlq_topic, None)):
            try:
                for p in topic_offsets(settings.kafka, topic, group):
                    topics.append({"topic": topic, "partition": p.partition, "end": p.end,
                                   "committed": p.committed, "lag": p.lag if group else None})
            except KafkaError as exc:
                topics.append({"topic": topic, "error": str(exc)})
    replication = topic_problems(settings) if health[0]["ok"] else []
    # Status answers within seconds even when a long write holds the store.
    store = Store(settings.db_path, min(settings.store.lock_timeout_s, STORE_WAIT_S))
    counts: dict[str, int] = {}
    dead: list[tuple[str, int]] = []
    adapters: list[dict[str, Any]] = []
    drift: list[tuple[Any, ...]] = []
    freeze: dict[str, Any] | None = None
    canary: list[dict[str, Any]] = []
    last_change: dict[str, Any] | None = None
    store_busy: str | None = None
    if store.path.exists():
        try:
            counts = store.counts()
            with store.connect() as con:
                dead = con.execute(
                    "SELECT regexp_replace(reason, '[0-9]+', 'N', 'g') AS r, count(*) "
                    "FROM dead_letters GROUP BY r ORDER BY 2 DESC LIMIT 5"
                ).fetchall()
                adapters = [
                    {"version": r[0], "name": r[1], "state": r[2], "dataset": r[3],
                     "created_at": r[4], "golden_accuracy": r[5], "golden_macro_f1": r[6]}
                    for r in con.execute(
                        "SELECT version, name, state, dataset_version, created_at, "
                        "CAST(metrics->'golden'->>'accuracy' AS DOUBLE), "
                        "CAST(metrics->'golden'->>'macro_f1' AS DOUBLE) FROM adapters "
                        "ORDER BY created_at DESC LIMIT 5").fetchall()]
                drift = con.execute(
                    "SELECT created_at, score, p_value, drifted FROM drift_reports "
                    "ORDER BY created_at DESC LIMIT 1"
                ).fetchall()
                change = con.execute(
                    "SELECT occurred_at, adapter_version, from_state, to_state, action, reason "
                    "FROM deployments WHERE to_state IN ('production', 'retired', 'rejected') "
                    "ORDER BY occurred_at DESC LIMIT 1").fetchall()
                if change:
                    last_change = dict(zip(("at", "version", "from", "to", "action", "reason"),
                                           change[0], strict=True))
                from tuneloop.services.canary.store import active_freeze, list_decisions

                freeze = active_freeze(con)
                canary = [{k: d[k] for k in ("created_at", "stage", "candidate", "incumbent",
                                             "verdict", "reason")}
                          for d in list_decisions(con, 3)]
        except StoreBusyError as exc:
            store_busy = str(exc)
    from tuneloop.services.ingest.service import read_status
    from tuneloop.services.loop.metrics import outbox_backlog

    ingest = read_status(settings.home)
    outboxes = outbox_backlog(settings.home)
    runs = recent_flow_runs(settings) if health[1]["ok"] else []
    serving: dict[str, Any] = {}
    if next((h["ok"] for h in health if h["component"] == "gateway"), False):
        from tuneloop.serving.control import GatewayAdmin, GatewayError

        try:
            serving = GatewayAdmin(settings, timeout_s=5).state()
        except GatewayError as exc:
            serving = {"error": str(exc)}
    return {"health": health, "topics": topics, "replication": replication, "counts": counts,
            "dead_letters": dead, "adapters": adapters, "latest_drift": drift, "db": str(store.path),
            "serving": serving, "freeze": freeze, "canary": canary, "last_change": last_change,
            "store_busy": store_busy, "ingest": ingest, "outbox_backlog": outboxes,
            "flow_runs": runs}


def recent_flow_runs(settings: Settings, limit: int = 8) -> list[dict[str, Any]]:
    """The latest flow runs from Prefect (name, state, when), newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(limit=limit, sort=FlowRunSort.START_TIME_DESC)
    except Exception as exc:  # noqa: BLE001 - status reports what it cannot reach
        return [{"error": f"{type(exc).__name__}: {exc}"}]
    return [{"name": r.name, "state": r.state_name, "started": r.start_time,
             "seconds": r.total_run_time.total_seconds() if r.total_run_time else None}
            for r in runs]


def render_status(report: dict[str, Any]) -> None:
    comp = Table(title="components", show_edge=False)
    comp.add_column("component")
    comp.add_column("state")
    comp.add_column("where")
    for h in report["health"]:
        comp.add_row(h["component"], "[green]up[/]" if h["ok"] else "[red]down[/]", h["detail"])
    console.print(comp)

    if report["topics"]:
        t = Table(title="topics", show_edge=False)
        for col in ("topic", "partition", "end offset", "committed", "lag"):
            t.add_column(col, justify="right" if col != "topic" else "left")
        for row in report["topics"]:
            if "error" in row:
                t.add_row(row["topic"], "-", f"[red]{row['error']}[/]", "", "")
                continue
            lag = row["lag"]
            lag_s = "" if lag is None else (f"[yellow]{lag}[/]" if lag else "0")
            t.add_row(row["topic"], str(row["partition"]), str(row["end"]),
                      "" if row["committed"] is None else str(row["committed"]), lag_s)
        console.print(t)
    for problem in report.get("replication") or []:
        console.print(f"[yellow]warning[/]: {problem}")

    if report["counts"]:
        c = Table(title=f"store {report['db']}", show_edge=False)
        c.add_column("table")
        c.add_column("rows", justify="right")
        for table, n in report["counts"].items():
            c.add_row(table, f"{n:,}")
        console.print(c)
    else:
        console.print(f"store: {report['db']} does not exist yet")

    if report.get("store_busy"):
        console.print(f"[yellow]store busy, figures from the store left out:[/] "
                      f"{report['store_busy']}")
    ingest = report.get("ingest") or {}
    if ingest:
        lag = ingest.get("lag")
        console.print(
            f"ingest: {ingest.get('events_per_min', 0):,.0f} events/min, lag "
            f"{'?' if lag is None else f'{lag:,}'}, {ingest.get('inserted', 0):,} landed, "
            f"{ingest.get('dead_letters', 0):,} dead letters, {ingest.get('duplicates', 0):,} "
            f"duplicates (as of {str(ingest.get('updated_at', ''))[11:19]} UTC)")
    backlog = report.get("outbox_backlog") or {}
    if any(backlog.values()):
        console.print("[yellow]outbox backlog:[/] " + ", ".join(
            f"{name} {n:,}" for name, n in backlog.items() if n))
    if report["dead_letters"]:
        lines = "\n".join(f"{n:>6}  {reason}" for reason, n in report["dead_letters"])
        console.print(Panel(lines, title="dead letters by reason", border_style="red"))
    if report["latest_drift"]:
        at, score, p, drifted = report["latest_drift"][0]
        console.print(f"latest drift check {at:%Y-%m-%d %H:%M}: novel share {score:.2f}, "
                      f"p={p:.3g}, "
                      + ("[red]DRIFT[/]" if drifted else "[green]no drift[/]"))
    serving = report.get("serving") or {}
    if serving.get("error"):
        console.print(f"[red]gateway:[/] {serving['error']}")
    if serving.get("routes"):
        r = Table(title="serving", show_edge=False)
        for col in ("alias", "production", "canary", "canary share", "shadow share"):
            r.add_column(col)
        for route in serving["routes"]:
            r.add_row(route["alias"], route["production"] or "base model",
                      route["candidate"] or "-", f"{100 * route['canary_share']:.0f}%",
                      f"{100 * route['shadow_share']:.0f}%")
        console.print(r)
        states = ", ".join(
            f"replica {rep['index']} [{'green' if rep['state'] == 'ready' else 'yellow'}]"
            f"{rep['state']}[/] ({rep['url']}, {rep['restarts']} restarts, "
            f"loaded: {', '.join(rep['loaded']) or 'no adapters'})"
            for rep in serving["replicas"])
        console.print(f"vLLM: {states}")
        for err in serving.get("errors", []):
            console.print(f"[red]cannot serve {err['version']}:[/] {err['error']}")
    if report.get("freeze"):
        f = report["freeze"]
        console.print(Panel(f"since {f['created_at']:%Y-%m-%d %H:%M}: {f['reason']}\n"
                            "lift with `tuneloop freeze lift --reason ...`",
                            title="PROMOTIONS FROZEN", border_style="red"))
    for d in report.get("canary") or []:
        colour = "green" if d["verdict"] in ("promote", "pass", "ok") else \
            "red" if d["verdict"] in ("reject", "rollback", "frozen") else "yellow"
        console.print(f"{d['stage']} {d['created_at']:%m-%d %H:%M} [{colour}]{d['verdict']}[/]: "
                      f"{d['reason'][:160]}")
    change = report.get("last_change")
    if change:
        console.print(f"last change {change['at']:%m-%d %H:%M}: {change['version']} "
                      f"{change['from']} -> {change['to']} ({change['action']}): "
                      f"{change['reason'][:160]}")
    if report["adapters"]:
        a = Table(title="adapters", show_edge=False)
        for col in ("version", "name", "state", "dataset", "golden acc / macro-F1", "created"):
            a.add_column(col)
        for ad in report["adapters"]:
            gold = "-" if ad["golden_accuracy"] is None else \
                f"{ad['golden_accuracy']:.3f} / {ad['golden_macro_f1'] or 0:.3f}"
            a.add_row(str(ad["version"]), ad["name"], ad["state"], ad["dataset"] or "", gold,
                      f"{ad['created_at']:%Y-%m-%d %H:%M}")
        console.print(a)
    runs = report.get("flow_runs") or []
    if runs:
        f = Table(title="recent flow runs", show_edge=False)
        for col in ("run", "state", "started", "seconds"):
            f.add_column(col)
        for run in runs:
            if "error" in run:
                f.add_row(f"[red]{run['error']}[/]", "", "", "")
                continue
            colour = {"Completed": "green", "Failed": "red", "Crashed": "red",
                      "Running": "cyan"}.get(run["state"], "yellow")
            f.add_row(run["name"], f"[{colour}]{run['state']}[/]",
                      f"{run['started']:%m-%d %H:%M:%S}" if run["started"] else "-",
                      "-" if run["seconds"] is None else f"{run['seconds']:.0f}")
        console.print(f)
