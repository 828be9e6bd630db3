"""``tuneloop demo``: the loop runs itself on the embedded stack, start to finish.

1. Bootstrap: the stack comes up (in ``<home>/demo``, wiped first); the production app's
   labelled history for the old intents lands in DuckDB; a golden set is pinned from
   it; ``tuneloop retrain`` trains the first adapter, and the loop's canary promotes it
   against the base model while simulated users ask and rate.
2. Steady traffic from the same intents, sent with the official ``openai`` client as end
   users do, a support agent labelling a share of answers through ``/v1/feedback``: the
   drift checks find nothing, nothing retrains.
3. Shift: half of the traffic now comes from intents the adapter never saw. No person
   acts: the drift check fires and names them, the retrain curates, trains from
   production's weights and publishes, the canary gates the candidate and promotes it.
4. Report: held-out queries of the old and the new intents through the gateway alias,
   before and after; one HTML page with the plots (``<home>/demo/reports/demo.html``),
   a terminal summary and ``FIGURE`` lines.

The default is the small scenario (6 old intents, 3 new); ``--full`` runs the larger one
(about half the dataset's intents, 10 new) on the same path. Nothing in it is specific
to banking77: ``--data`` takes any intent dataset in the same layout (``train.csv`` and
``test.csv`` with ``text`` and ``category``, and ``categories.json``); intents are drawn
at random (seeded), and every size scales with the number of intents.

``--task json`` and ``--task text`` run the same scenario on an extraction or a reply
alias (``[tasks.<alias>]`` in the demo's settings): the data is a folder in the task-data
layout (``train.csv`` and ``test.csv`` with ``text``, ``target`` and one group column;
default the bundled SNIPS and SGD), the groups (intents, services) play the intents'
part, users judge answers by the kind, and the figures are the kind's (field exact
match and the schema-valid rate; chrF).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import tomllib
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
import yaml
from rich.rule import Rule

from tuneloop.cli.common import console, fail, settings_of
from tuneloop.cli.demo_report import print_scores, print_summary
from tuneloop.runtime.settings import CONFIG_ENV, Settings, load_settings
from tuneloop.services.demo import banking77
from tuneloop.services.demo.banking77 import Query
from tuneloop.services.demo.result import NEW, OLD, Result, Scores, missed_goals
from tuneloop.services.demo.scenario import (
    FULL,
    KIND_SETTINGS,
    SMALL,
    Plan,
    Scenario,
    for_kind,
    merge,
    to_toml,
)
from tuneloop.services.demo.task import DemoTask

if TYPE_CHECKING:
    from tuneloop.services.demo.simulation import SimulatedUsers
    from tuneloop.services.store.database import AnyStore

# Each look at the store waits this long for a writer (a retrain's publish, a curation).
STORE_WAIT_S = 60


def register(app: typer.Typer) -> None:
    """Add ``tuneloop demo`` to ``app``."""
    app.command("demo")(demo)


def demo(
    ctx: typer.Context,
    full: bool = typer.Option(
        False, "--full", help="The larger scenario: about half the dataset's intents (at most "
        "40) before the shift and 10 new ones; about two hours on 2 CPU cores."),
    quick: bool = typer.Option(
        False, "--quick", help="The default, small scenario (6 old intents, 3 new), by name."),
    task: str = typer.Option(
        "label", "--task", help="What the alias answers: label (an intent name), json (an "
        "object of slots) or text (a reply)."),
    data: Path | None = typer.Option(
        None, "--data", help="Dataset folder. label: train.csv, test.csv (text, category) "
        "and categories.json, default the bundled banking77; json and text: train.csv and "
        "test.csv (text, target, a group column), default the bundled SNIPS and SGD."),
    seed: int = typer.Option(0, "--seed", help="Which intents are old and new."),
    dpo: bool = typer.Option(
        False, "--dpo", help="At the end, DPO on the promoted adapter with its dataset's "
        "preference pairs, and both adapters' ranking of held-out pairs."),
    keep_up: bool = typer.Option(True, "--keep-up/--down", help="Leave the stack running."),
    split: bool = typer.Option(
        False, "--split", help="Each role in a home of its own with no path in common "
        "(`tuneloop up --split`): the store in Postgres, artifacts in the object store, "
        "training on its own work pool, two ingest workers, two vLLM replicas."),
) -> None:
    """Run the loop unattended on the embedded stack: bootstrap, steady traffic, a shift."""
    if full and quick:
        raise fail("--full and --quick name two scenarios; pass one (the default is --quick)")
    if task not in ("label", "json", "text"):
        raise fail(f"--task {task}: use label, json or text")
    if task != "label" and data is None:
        from tuneloop.services.demo.task_data import bundled

        data = bundled({"json": "snips", "text": "sgd"}[task])
    scenario = for_kind(FULL if full else SMALL, task)
    settings = _fresh_home(ctx, scenario, task, data, split)
    try:
        result = run_scenario(ctx, settings, scenario, data, seed, dpo, split)
    finally:
        if not keep_up:
            _tuneloop(ctx, Path(settings.home), "down")
    print_summary(settings, result)


def _fresh_home(ctx: typer.Context, scenario: Scenario, task: str = "label",
                data: Path | None = None, split: bool = False) -> Settings:
    """Stop a stack left in ``<home>/demo``, wipe it, and write the demo's settings there:
    the user's settings file with the scenario's sizes over it, and for ``json`` and
    ``text`` the alias's task spec and a recipe whose sequences hold an object or a reply."""
    home = Path(settings_of(ctx).home) / "demo"
    base: dict[str, Any] = {}
    if os.environ.get(CONFIG_ENV) and Path(os.environ[CONFIG_ENV]).exists():
        base = tomllib.loads(Path(os.environ[CONFIG_ENV]).read_text())
    _tuneloop(ctx, home, "down")
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    try:
        merged, recipe = demo_settings(base, scenario, task, data or Path(), home)
    except (OSError, ValueError) as exc:
        raise fail(f"--data {data}: {exc}") from None
    if split:
        from tuneloop.infra.split import split_settings

        merged = merge(merged, split_settings(home))
    if recipe is not None:
        (home / "recipe.yaml").write_text(recipe)
    config = home / "demo.toml"
    config.touch(mode=0o600)  # --split writes the keys into it
    config.chmod(0o600)
    config.write_text(to_toml(merged))
    os.environ[CONFIG_ENV] = str(config)
    os.environ["TUNELOOP_HOME"] = str(home)
    return load_settings({"home": home})


def demo_settings(base: dict[str, Any], scenario: Scenario, task: str, data: Path,
                  home: Path) -> tuple[dict[str, Any], str | None]:
    """The demo's settings (``base``, the user's, with the scenario's sizes over them) and,
    for ``json`` and ``text``, its recipe's YAML (``<home>/recipe.yaml``). The alias's
    task is the one ``task`` names, whatever ``base`` says of it. Raises ``OSError`` or
    ``ValueError`` when ``data`` holds no usable task folder."""
    from tuneloop.services.demo.task import spec_table
    from tuneloop.training.config import DEMO_CONFIG, task_recipe_fields

    merged = merge(merge(base, scenario.settings),
                   {"training": {"config": str(DEMO_CONFIG)}})
    # The served alias as settings will load it: the environment over the file.
    alias = os.environ.get("TUNELOOP_SERVING__ALIAS") or \
        (merged.get("serving") or {}).get("alias") or load_settings({"home": home}).serving.alias
    tasks = dict(merged.get("tasks") or {})
    tasks.pop(alias, None)
    recipe = None
    if task != "label":
        tasks[alias] = spec_table(task, data, home)
        merged = merge(merged, KIND_SETTINGS.get(task, {}))
        recipe = (f"# tuneloop demo --task {task}: the demo recipe, with sequences that "
                  "hold an object or a reply, and three passes\n"
                  + yaml.safe_dump(task_recipe_fields(task), sort_keys=False))
        merged["training"]["config"] = str(home / "recipe.yaml")
    merged.pop("tasks", None)
    if tasks:
        merged["tasks"] = tasks
    return merged, recipe


def _tuneloop(ctx: typer.Context, home: Path, *args: str) -> None:
    """Another tuneloop command in this process, on the demo's home, with the root flags.
    Raises ``typer.Exit`` (after saying which) when the command fails."""
    from tuneloop.cli.main import app

    root = ctx.find_root().params
    prefix = ["--home", str(home)]
    for flag, name in (("--bootstrap-servers", "bootstrap_servers"), ("--log-level", "log_level")):
        if root.get(name) is not None:
            prefix += [flag, str(root[name])]
    try:
        app(prefix + list(args), standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise fail(f"`tuneloop {' '.join(args)}` failed (exit {exc.code})") from None


@dataclass(frozen=True)
class Answers:
    """The alias's answers to the held-out queries of each group, in the plan's order."""

    old: list[str]
    new: list[str]


def run_scenario(ctx: typer.Context, settings: Settings, sc: Scenario, data: Path | None,
                 seed: int, dpo: bool = False, split: bool = False) -> Result:
    """The four phases on the running demo home; returns what they measured, also written
    to ``reports/demo.json`` beside the HTML report. Raises ``typer.Exit`` when a step
    fails (the stack does not come up, the ingest does not land the history)."""
    task = DemoTask(settings.task)
    plan = _plan(sc, data, seed, task)
    result = Result(str(data or banking77.data_dir()), plan.old, plan.new, kind=task.kind,
                    headline=task.headline)
    started = time.monotonic()
    first = _bootstrap(ctx, settings, sc, plan, result, task, split)
    before = _measure_before(settings, plan, result, first, task)
    shift_at = _shift(settings, sc, plan, result, first, task)
    _measure_after(settings, plan, result, before, shift_at, task)
    result.timings["total_s"] = time.monotonic() - started  # the loop's phases
    if dpo:
        # The loop's figures are on disk before the extra phase, which may fail.
        _write_outputs(settings, replace(result, missed=result.missed + missed_goals(result)))
        try:
            _preferences(settings, result)
        except Exception as exc:  # noqa: BLE001 - the demo's other figures still stand
            console.print_exception()
            result.missed.append(f"--dpo: failed: {type(exc).__name__}: {exc}")
        result.timings["total_with_dpo_s"] = time.monotonic() - started
    result.missed += missed_goals(result)
    _write_outputs(settings, result)
    return result


def _plan(sc: Scenario, data: Path | None, seed: int, task: DemoTask) -> Plan:
    from tuneloop.services.demo.scenario import plan
    from tuneloop.services.demo.task import load_queries

    try:
        if task.kind == "label":
            return plan(sc, banking77.intents(data), banking77.load("train", data),
                        banking77.load("test", data), seed)
        # A group needs its history, its held-out queries and some traffic beyond both.
        groups, train, test = load_queries(
            data or Path(), sc.heldout_per_intent,
            min_rows=sc.history_per_intent + sc.heldout_per_intent + 20, seed=seed)
        return plan(sc, groups, train, test, seed)
    except (OSError, ValueError, KeyError) as exc:
        raise fail(f"--data {data or banking77.data_dir()}: {exc}") from None


def _users(settings: Settings, sc: Scenario, queries: list[Query], task: DemoTask
           ) -> SimulatedUsers:
    """The demo's users asking ``queries``; for json and text they ask the query alone
    (the gateway adds the task's system prompt) and judge by the kind."""
    from tuneloop.services.demo.simulation import SimulatedUsers

    if task.kind == "label":
        return SimulatedUsers(settings, queries, workers=sc.users, rate=sc.rate,
                              label_share=sc.label_share)
    return SimulatedUsers(settings, queries, workers=sc.users, rate=sc.rate,
                          label_share=sc.label_share, max_tokens=task.answer_tokens,
                          chat_of=task.chat, right_of=task.right)


def _bootstrap(ctx: typer.Context, settings: Settings, sc: Scenario, plan: Plan,
               result: Result, task: DemoTask, split: bool = False) -> str | None:
    """Phases 1 and 2: the stack, the app's history, the first adapter, steady traffic.
    Returns the first adapter's version (None when none was promoted in time)."""
    home = Path(settings.home)
    t0 = time.monotonic()
    console.print(Rule("1. bootstrap: the embedded stack (tansu, Prefect, worker, ingest, "
                       "gateway + vLLM)"))
    _tuneloop(ctx, home, "up", *(["--split"] if split else []))
    result.timings["up_s"] = time.monotonic() - t0
    console.print(f"the production app's history: {len(plan.history):,} labelled queries over "
                  f"{len(plan.old)} intents, through the producer SDK")
    _send_history(settings, plan.history, plan.seed, task, result.dataset)
    _wait_for_rows(settings, len(plan.history))
    _tuneloop(ctx, home, "golden", "add", "--count", str(sc.golden_per_intent * len(plan.old)))

    users = _users(settings, sc, plan.steady, task)
    t0 = time.monotonic()
    with users.running(ingest=False):
        console.print(f"{sc.users} users ask the alias meanwhile, {sc.rate} questions/s in all "
                      "(the base model answers them)")
        _tuneloop(ctx, home, "retrain", "--reason", "bootstrap: the first adapter")
        first = _wait_for_promotion(settings, None, sc.shift_timeout_s, "first adapter")
        result.bootstrap_version = first
        result.timings["bootstrap_s"] = time.monotonic() - t0
        console.print(Rule(f"2. steady traffic for {sc.steady_s:.0f} s: the same intents"))
        time.sleep(sc.steady_s)
    result.served_failures += len(users.failures)
    return first


def _measure_before(settings: Settings, plan: Plan, result: Result, first: str | None,
                    task: DemoTask) -> Answers:
    """The held-out queries before the shift, and what steady traffic set off."""
    from tuneloop.services.demo.store import activity_since

    console.print(f"held-out queries through the alias, before: {len(plan.heldout_old)} "
                  f"old-intent, {len(plan.heldout_new)} new-intent")
    result.before, answers = _measure(settings, plan, task)
    print_scores("before", result.before)
    # Everything from the first promotion to the shift is steady traffic.
    since = _promoted_at(settings, first) if first else datetime.now(UTC)
    with _store(settings).connect() as con:
        steady = activity_since(con, since)
    result.steady_drift_alarms, result.steady_retrains = steady.drift_alarms, steady.retrains
    console.print(f"steady traffic since the first promotion: {steady.drift_alarms} drift "
                  f"alarm(s), {steady.retrains} retrain(s)")
    return answers


def _shift(settings: Settings, sc: Scenario, plan: Plan, result: Result,
           first: str | None, task: DemoTask) -> datetime:
    """Phase 3: the shifted traffic until the loop promotes a new version; returns when
    the shift began."""
    console.print(Rule(f"3. shift: {sc.new_share:.0%} of traffic from {len(plan.new)} intents "
                       "the adapter never saw; nobody acts"))
    users = _users(settings, sc, plan.shifted, task)
    shift_at = datetime.now(UTC)
    result.shift_at = shift_at.isoformat()
    t0 = time.monotonic()
    with users.running(ingest=False):
        promoted = _wait_for_promotion(settings, first, sc.shift_timeout_s, "the loop")
    result.served_failures += len(users.failures)
    if promoted is None:
        result.missed.append(f"no promotion within {sc.shift_timeout_s:.0f} s of the shift")
    else:
        at = _promoted_at(settings, promoted)
        result.promoted_version, result.promoted_at = promoted, at.isoformat()
        result.shift_to_promotion_s = round((at - shift_at).total_seconds(), 1)
    result.timings["shift_s"] = time.monotonic() - t0
    return shift_at


def _measure_after(settings: Settings, plan: Plan, result: Result, before: Answers,
                   shift_at: datetime, task: DemoTask) -> None:
    """Phase 4's figures: what the first alarm after the shift named, and the same
    held-out queries again."""
    from tuneloop.services.demo.result import mean_delta, named_intents, old_delta
    from tuneloop.services.drift.store import first_alarm_clusters

    with _store(settings).connect() as con:
        clusters = first_alarm_clusters(con, shift_at)
    result.drift_clusters = clusters or []
    result.named_new_intents = named_intents(result.drift_clusters, plan.new)
    console.print(Rule("4. after: the same held-out queries through the alias"))
    result.after, after = _measure(settings, plan, task)
    print_scores("after", result.after)
    if task.kind == "label":
        result.old_intents_delta = old_delta(plan.heldout_old, before.old, after.old)
        return
    result.old_intents_delta = mean_delta(task.per_example(before.old, plan.heldout_old),
                                          task.per_example(after.old, plan.heldout_old))
    result.new_intents_delta = mean_delta(task.per_example(before.new, plan.heldout_new),
                                          task.per_example(after.new, plan.heldout_new))


def _preferences(settings: Settings, result: Result) -> None:
    """Phase 5 (``--dpo``): DPO on the promoted adapter (the loop's SFT) with the preference
    pairs of its dataset (corrections: the correction over the answer served), and the
    share of the dataset's held-out pairs each adapter ranks right by implicit reward."""
    from tuneloop.services.registry.remote import local_files
    from tuneloop.services.registry.store import get_adapter
    from tuneloop.training.pipeline import (
        Workspace,
        load_inputs,
        recipe_config,
        train_candidate,
    )

    if result.promoted_version is None:
        result.missed.append("--dpo: no promoted adapter to run DPO on")
        return
    console.print(Rule(f"5. preferences: DPO on {result.promoted_version} with its dataset's "
                       "pairs"))
    t0 = time.monotonic()
    store = _store(settings)
    with store.connect() as con:
        adapter = get_adapter(con, result.promoted_version)
    if adapter.dataset_version is None:
        result.missed.append(f"--dpo: {adapter.version} has no dataset")
        return
    splits, _ = load_inputs(store, adapter.dataset_version)
    try:
        run = train_candidate(
            Workspace.of(settings), splits, [], recipe_config(settings.training, objective="dpo"),
            f"demo-dpo-{adapter.version}", show_progress=False,
            init_adapter=local_files(adapter, settings))
    except ValueError as exc:  # no train pairs
        result.missed.append(f"--dpo: {exc}")
        return
    pref = run.metrics["preference"]
    result.dpo = {"pairs_train": float(sum(p.split == "train" for p in splits.preferences)),
                  "pairs_held_out": float(pref["held_out_pairs"]),
                  "pair_accuracy_sft": _figure(pref["ranking_accuracy_before"]),
                  "pair_accuracy_dpo": _figure(pref["ranking_accuracy_after"])}
    result.timings["dpo_s"] = time.monotonic() - t0
    console.print(f"held-out pairs ranked right by implicit reward: "
                  f"{result.dpo['pair_accuracy_sft']:.3f} after SFT ({adapter.version}), "
                  f"{result.dpo['pair_accuracy_dpo']:.3f} after DPO on it "
                  f"({pref['held_out_pairs']} pairs; DPO on {result.dpo['pairs_train']:.0f})")


def _figure(value: float | None) -> float:
    """A measured figure, NaN where there was nothing to measure (no held-out pairs)."""
    return float("nan") if value is None else float(value)


def _write_outputs(settings: Settings, result: Result) -> None:
    from tuneloop.cli.demo_report import write_report

    result.report = str(write_report(settings, result))
    (Path(settings.home) / "reports" / "demo.json").write_text(
        json.dumps(asdict(result), indent=2))


def _store(settings: Settings) -> AnyStore:
    from tuneloop.services.store.database import Store

    return Store.of(settings, STORE_WAIT_S)


def _send_history(settings: Settings, queries: list[Query], seed: int, task: DemoTask,
                  dataset: str) -> None:
    from tuneloop.services.feedback.producer import FeedbackProducer

    extra: dict[str, Any] = {} if task.kind == "label" else {
        "system_prompt": task.spec.system_prompt, "source": Path(dataset).name}
    events = list(banking77.to_events(queries, app=settings.serving.alias, seed=seed,
                                      accuracy=0.0, spacing_s=0.01, **extra))
    with FeedbackProducer(settings) as producer:
        producer.send_many(events)
        report = producer.flush(120)
    if not report.complete:
        raise fail(f"{report.pending} history events still in the outbox after 120 s")


def _wait_for_rows(settings: Settings, n: int, timeout_s: float = 300) -> None:
    """The long-running ingest lands the history; wait until it did."""
    from tuneloop.services.store.database import Store

    deadline = time.monotonic() + timeout_s
    with console.status(f"the ingest lands {n:,} events..."):
        while time.monotonic() < deadline:
            if Store.of(settings, 30).counts().get("feedback", 0) >= n:
                return
            time.sleep(1)
    raise fail(f"the ingest landed fewer than {n} events in {timeout_s:.0f} s; "
               "see `tuneloop status` and <home>/logs/ingest.log")


def _wait_for_promotion(settings: Settings, current: str | None, timeout_s: float,
                        who: str) -> str | None:
    """Wait until the alias's production is a version other than ``current``, narrating
    the loop's decisions meanwhile; None when ``timeout_s`` passes first."""
    from tuneloop.services.canary.store import list_decisions
    from tuneloop.services.registry.store import production
    from tuneloop.services.store.database import StoreBusyError

    seen: set[str] = set()
    started, deadline = time.monotonic(), time.monotonic() + timeout_s
    # Decisions older than the wait (less a few seconds of clock skew) were narrated before.
    since = time.time() - 5
    with console.status(f"waiting for {who} to promote a new version...") as status:
        while time.monotonic() < deadline:
            try:
                with _store(settings).connect() as con:
                    decisions = list_decisions(con, 10)
                    adapter = production(con, settings.serving.alias)
            except StoreBusyError:
                continue  # a long write; look again
            _narrate([d for d in reversed(decisions) if d["decision_id"] not in seen], since)
            seen.update(d["decision_id"] for d in decisions)
            if adapter is not None and adapter.version != current:
                return adapter.version
            status.update(f"waiting for {who} to promote a new version... "
                          f"{time.monotonic() - started:.0f} s")
            time.sleep(5)
    return None


DECISION_COLOURS = {"promote": "green", "pass": "green", "trained": "cyan", "reject": "red",
                    "rollback": "red"}


def _narrate(decisions: list[dict[str, Any]], since: float) -> None:
    """One line a decision taken after ``since`` (epoch seconds), oldest first."""
    for d in decisions:
        if d["created_at"].timestamp() < since:
            continue
        colour = DECISION_COLOURS.get(d["verdict"], "yellow")
        console.print(f"  {d['created_at']:%H:%M:%S} [{colour}]{d['stage']} "
                      f"{d['verdict']}[/]: {d['reason'][:150]}", highlight=False)


def _promoted_at(settings: Settings, version: str) -> datetime:
    from tuneloop.services.demo.store import promoted_at

    with _store(settings).connect() as con:
        at = promoted_at(con, version)
    return at if at is not None else datetime.now(UTC)


def _measure(settings: Settings, plan: Plan, task: DemoTask) -> tuple[Scores, Answers]:
    """The kind's figures of the alias's answers to the held-out queries, per group (for
    intents accuracy and macro-F1), as end users get them; and the answers."""
    from tuneloop.services.demo.simulation import ask_alias

    ask: dict[str, Any] = {} if task.kind == "label" else {
        "max_tokens": task.answer_tokens, "chat_of": task.chat}
    with console.status("asking the alias..."):
        answers = Answers(ask_alias(settings, plan.heldout_old, **ask),
                          ask_alias(settings, plan.heldout_new, **ask))
    return {OLD: task.scores(answers.old, plan.heldout_old),
            NEW: task.scores(answers.new, plan.heldout_new)}, answers

