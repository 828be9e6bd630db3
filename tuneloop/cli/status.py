"""``tuneloop status``: health of each component, topic offsets and lag, the store's
figures, serving routes, the loop's latest decisions and flow runs.

:func:`collect_status` gathers a :class:`StatusReport` step by step (each step asks
the component that owns the figure); :func:`render_status` prints it, one small
function a section. Exit code 1 when a component is down.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import typer
from rich.panel import Panel
from rich.table import Table

from tuneloop.cli.common import console, settings_of
from tuneloop.runtime.settings import Settings

if TYPE_CHECKING:  # the stack's modules load only when status runs
    from tuneloop.infra.prefect_server import FlowRunLine
    from tuneloop.infra.stack import Health
    from tuneloop.services.loop.status import AdapterLine, StoreFigures

# Status answers within seconds even when a long write holds the store.
STORE_WAIT_S = 3.0


@dataclass(frozen=True)
class TopicLine:
    """Offsets of one partition, or ``error`` alone when the topic could not be read."""

    topic: str
    partition: int | None = None
    end: int | None = None
    committed: int | None = None
    lag: int | None = None  # None for a topic no group consumes (the dead-letter topic)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The line in ``tuneloop status --json``."""
        if self.error is not None:
            return {"topic": self.topic, "error": self.error}
        return {"topic": self.topic, "partition": self.partition, "end": self.end,
                "committed": self.committed, "lag": self.lag}


@dataclass
class StatusReport:
    """Everything ``tuneloop status`` shows."""

    health: list[Health]
    topics: list[TopicLine]
    replication: list[str]
    store: StoreFigures
    ingest: dict[str, Any] | None  # the ingest's own figures (services.ingest.service)
    outbox_backlog: dict[str, int]
    flow_runs: list[FlowRunLine]
    serving: dict[str, Any]  # the gateway's /admin/state, or {"error": ...}
    task: dict[str, Any] = field(default_factory=dict)  # the served alias's task spec

    @property
    def down(self) -> list[str]:
        """Components that are not healthy."""
        return [h.component for h in self.health if not h.ok]

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document (its keys are what scripts and tests read)."""
        s = self.store
        drift = s.latest_drift
        change = s.last_change
        return {
            "health": [asdict(h) for h in self.health],
            "topics": [t.to_json() for t in self.topics],
            "replication": self.replication, "counts": s.counts,
            "dead_letters": [(d.reason, d.count) for d in s.dead_letters],
            "adapters": [asdict(a) for a in s.adapters],
            "latest_drift": [(drift.created_at, drift.score, drift.p_value, drift.drifted)]
            if drift else [],
            "db": str(s.path), "serving": self.serving, "freeze": s.freeze,
            "canary": [asdict(d) for d in s.decisions],
            "last_change": {"at": change.at, "version": change.version,
                            "from": change.from_state, "to": change.to_state,
                            "action": change.action, "reason": change.reason}
            if change else None,
            "store_busy": s.busy, "ingest": self.ingest, "outbox_backlog": self.outbox_backlog,
            "flow_runs": [r.to_json() for r in self.flow_runs],
            "task": self.task,
        }


def status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Health of each component, topic offsets and lag, row counts, dead letters."""
    report = collect_status(settings_of(ctx))
    if as_json:
        console.print_json(json.dumps(report.to_json(), default=str))
    else:
        render_status(report)
    if report.down:
        raise typer.Exit(1)


# ------------------------------------------------------------------ collecting
def collect_status(settings: Settings) -> StatusReport:
    """Ask each component for its figures; a component that is down is not asked."""
    from tuneloop.infra.prefect_server import recent_flow_runs
    from tuneloop.infra.split import Split, is_split
    from tuneloop.infra.stack import Stack
    from tuneloop.services.ingest.service import read_status
    from tuneloop.services.loop.metrics import outbox_backlog
    from tuneloop.services.loop.status import read_store_figures
    from tuneloop.services.store.database import Store

    health = Split(settings).health() if is_split(settings.home) else Stack(settings).health()
    kafka_up = _is_up(health, "kafka")
    store = Store.of(settings, min(settings.store.lock_timeout_s, STORE_WAIT_S))
    return StatusReport(
        health=health,
        topics=topic_lines(settings) if kafka_up else [],
        replication=topic_problems(settings) if kafka_up else [],
        store=read_store_figures(store),
        ingest=read_status(settings.home),
        outbox_backlog=outbox_backlog(settings.home),
        flow_runs=recent_flow_runs() if _is_up(health, "prefect") else [],
        serving=gateway_state(settings) if _is_up(health, "gateway") else {},
        task={"alias": settings.serving.alias} | settings.task.describe(),
    )


def _is_up(health: list[Health], component: str) -> bool:
    return next((h.ok for h in health if h.component == component), False)


def topic_lines(settings: Settings) -> list[TopicLine]:
    """Offsets of the feedback topic (with the ingest group's lag) and the dead-letter topic."""
    from kafka.errors import KafkaError

    from tuneloop.services.feedback.topics import topic_offsets

    lines: list[TopicLine] = []
    for topic, group in ((settings.kafka.topic, settings.kafka.group_id),
                         (settings.kafka.dlq_topic, None)):
        try:
            lines += [TopicLine(topic, p.partition, p.end, p.committed, p.lag if group else None)
                      for p in topic_offsets(settings.kafka, topic, group)]
        except KafkaError as exc:
            lines.append(TopicLine(topic, error=str(exc)))
    return lines


def topic_problems(settings: Settings) -> list[str]:
    """Topics of an external cluster below the configured replication (the embedded
    broker is one node: nothing to report). A cluster that cannot be asked is one problem."""
    if settings.kafka.embedded:
        return []
    from kafka.errors import KafkaError

    from tuneloop.services.feedback.topics import under_replicated

    try:
        return under_replicated(settings.kafka, (settings.serving.shadow_topic,))
    except KafkaError as exc:
        return [f"could not check the topics' replication: {exc}"]


def gateway_state(settings: Settings) -> dict[str, Any]:
    """The gateway's routes and replicas; ``{"error": ...}`` when it does not answer."""
    from tuneloop.serving.control import GatewayAdmin, GatewayError

    try:
        return GatewayAdmin(settings, timeout_s=5).state()
    except GatewayError as exc:
        return {"error": str(exc)}


# ------------------------------------------------------------------ rendering
def render_status(report: StatusReport) -> None:
    """Print the report for a person, section by section."""
    _components(report.health)
    _topics(report.topics)
    for problem in report.replication:
        console.print(f"[yellow]warning[/]: {problem}")
    _store_counts(report.store)
    _ingest(report.ingest or {})
    _outboxes(report.outbox_backlog)
    _dead_letters(report.store)
    _drift(report.store)
    _task(report.task)
    _serving(report.serving)
    _freeze(report.store.freeze)
    _decisions(report.store)
    _last_change(report.store)
    _adapters(report.store)
    _flow_runs(report.flow_runs)


def _table(title: str, *columns: str, right: tuple[str, ...] = ()) -> Table:
    table = Table(title=title, show_edge=False)
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left")
    return table


def _components(health: list[Health]) -> None:
    table = _table("components", "component", "state", "where")
    for h in health:
        table.add_row(h.component, "[green]up[/]" if h.ok else "[red]down[/]", h.detail)
    console.print(table)


def _topics(topics: list[TopicLine]) -> None:
    if not topics:
        return
    table = _table("topics", "topic", "partition", "end offset", "committed", "lag",
                   right=("partition", "end offset", "committed", "lag"))
    for row in topics:
        if row.error is not None:
            table.add_row(row.topic, "-", f"[red]{row.error}[/]", "", "")
            continue
        lag = "" if row.lag is None else (f"[yellow]{row.lag}[/]" if row.lag else "0")
        table.add_row(row.topic, str(row.partition), str(row.end),
                      "" if row.committed is None else str(row.committed), lag)
    console.print(table)


def _store_counts(store: StoreFigures) -> None:
    if store.counts:
        table = _table(f"store {store.path}", "table", "rows", right=("rows",))
        for name, n in store.counts.items():
            table.add_row(name, f"{n:,}")
        console.print(table)
    else:
        console.print(f"store: {store.path} does not exist yet", soft_wrap=True)
    if store.busy:
        console.print(f"[yellow]store busy, figures from the store left out:[/] {store.busy}",
                      soft_wrap=True)


def _ingest(ingest: dict[str, Any]) -> None:
    if not ingest:
        return
    lag = ingest.get("lag")
    console.print(
        f"ingest: {ingest.get('events_per_min', 0):,.0f} events/min, lag "
        f"{'?' if lag is None else f'{lag:,}'}, {ingest.get('inserted', 0):,} landed, "
        f"{ingest.get('dead_letters', 0):,} dead letters, {ingest.get('duplicates', 0):,} "
        f"duplicates (as of {str(ingest.get('updated_at', ''))[11:19]} UTC)")


def _outboxes(backlog: dict[str, int]) -> None:
    if any(backlog.values()):
        console.print("[yellow]outbox backlog:[/] " + ", ".join(
            f"{name} {n:,}" for name, n in backlog.items() if n))


def _dead_letters(store: StoreFigures) -> None:
    if store.dead_letters:
        lines = "\n".join(f"{d.count:>6}  {d.reason}" for d in store.dead_letters)
        console.print(Panel(lines, title="dead letters by reason", border_style="red"))


def _drift(store: StoreFigures) -> None:
    d = store.latest_drift
    if d is not None:
        console.print(f"latest drift check {d.created_at:%Y-%m-%d %H:%M}: novel share "
                      f"{d.score:.2f}, p={d.p_value:.3g}, "
                      + ("[red]DRIFT[/]" if d.drifted else "[green]no drift[/]"))


def _task(task: dict[str, Any]) -> None:
    if not task:
        return
    parts = [f"answers up to {task['answer_tokens']} tokens"]
    if task.get("json_schema"):
        required = (task.get("schema") or {}).get("required") or []
        parts.insert(0, f"schema {task['json_schema']}" +
                     (f" (requires {', '.join(map(str, required))})" if required else ""))
    if task.get("kind") != "label":
        parts.append(f"targets: corrections and answers rated >= {task['target_min_rating']}")
    prompt = task.get("system_prompt")
    parts.append(f"system prompt: {prompt!r}" if prompt else "system prompt: the apps' own")
    console.print(f"task: {task['alias']} is a [bold]{task['kind']}[/] task; " + "; ".join(parts),
                  soft_wrap=True)


def _serving(serving: dict[str, Any]) -> None:
    if serving.get("error"):
        console.print(f"[red]gateway:[/] {serving['error']}")
    if not serving.get("routes"):
        return
    table = _table("serving", "alias", "production", "canary", "canary share", "shadow share")
    for route in serving["routes"]:
        table.add_row(route["alias"], route["production"] or "base model",
                      route["candidate"] or "-", f"{100 * route['canary_share']:.0f}%",
                      f"{100 * route['shadow_share']:.0f}%")
    console.print(table)
    states = ", ".join(
        f"replica {rep['index']} [{'green' if rep['state'] == 'ready' else 'yellow'}]"
        f"{rep['state']}[/] ({rep['url']}, {rep['restarts']} restarts, "
        f"loaded: {', '.join(rep['loaded']) or 'no adapters'})"
        for rep in serving["replicas"])
    console.print(f"vLLM: {states}")
    for err in serving.get("errors", []):
        console.print(f"[red]cannot serve {err['version']}:[/] {err['error']}")
    for alarm in serving.get("degraded", []):
        console.print(Panel(alarm["summary"], title="SERVING AROUND A VERSION THAT CANNOT LOAD",
                            border_style="red"))


def _freeze(freeze: dict[str, Any] | None) -> None:
    if freeze:
        console.print(Panel(f"since {freeze['created_at']:%Y-%m-%d %H:%M}: {freeze['reason']}\n"
                            "lift with `tuneloop freeze lift --reason ...`",
                            title="PROMOTIONS FROZEN", border_style="red"))


def _verdict_colour(verdict: str) -> str:
    if verdict in ("promote", "pass", "ok"):
        return "green"
    return "red" if verdict in ("reject", "rollback", "frozen") else "yellow"


def _decisions(store: StoreFigures) -> None:
    for d in store.decisions:
        console.print(f"{d.stage} {d.created_at:%m-%d %H:%M} "
                      f"[{_verdict_colour(d.verdict)}]{d.verdict}[/]: {d.reason[:160]}")


def _last_change(store: StoreFigures) -> None:
    c = store.last_change
    if c is not None:
        console.print(f"last change {c.at:%m-%d %H:%M}: {c.version} {c.from_state} -> "
                      f"{c.to_state} ({c.action}): {c.reason[:160]}")


def _adapters(store: StoreFigures) -> None:
    if not store.adapters:
        return
    table = _table("adapters", "version", "name", "state", "dataset", "golden score", "created")
    for ad in store.adapters:
        table.add_row(ad.version, ad.name, ad.state, ad.dataset or "", golden_cell(ad),
                      f"{ad.created_at:%Y-%m-%d %H:%M}")
    console.print(table)


def golden_cell(ad: AdapterLine) -> str:
    """A version's golden score named by its task's metric: ``macro-F1 0.750 (acc 0.800)``,
    ``field F1 0.812``, ``chrF 0.634``. A version trained without a golden set shows the
    score its offline gate passed it with (``gate 0.640``); ``-`` when it has neither."""
    if ad.golden_score is not None:
        cell = f"{ad.golden_metric} {ad.golden_score:.3f}"
        if ad.golden_metric == "macro-F1" and ad.golden_accuracy is not None:
            cell += f" (acc {ad.golden_accuracy:.3f})"
        return cell
    return "-" if ad.promoted_score is None else f"gate {ad.promoted_score:.3f}"


RUN_COLOURS = {"Completed": "green", "Failed": "red", "Crashed": "red", "Running": "cyan"}


def _flow_runs(runs: list[FlowRunLine]) -> None:
    if not runs:
        return
    table = _table("recent flow runs", "run", "state", "started", "seconds")
    for run in runs:
        if run.error is not None:
            table.add_row(f"[red]{run.error}[/]", "", "", "")
            continue
        table.add_row(run.name, f"[{RUN_COLOURS.get(run.state or '', 'yellow')}]{run.state}[/]",
                      _time(run.started),
                      "-" if run.seconds is None else f"{run.seconds:.0f}")
    console.print(table)


def _time(at: datetime | None) -> str:
    return f"{at:%m-%d %H:%M:%S}" if at else "-"
