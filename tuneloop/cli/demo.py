"""``tuneloop demo``: the loop runs itself on the embedded stack, start to finish.

1. Bootstrap: the stack comes up (in ``<home>/demo``, wiped first); the production app's
   labelled history for about half of the intents lands in DuckDB; a golden set is
   pinned from it; ``tuneloop retrain`` trains the first adapter, and the loop's canary
   promotes it against the base model while simulated users ask and rate.
2. Steady traffic from the same intents, sent with the official ``openai`` client as end
   users do, a support agent labelling a share of answers through ``/v1/feedback``: the
   drift checks find nothing, nothing retrains.
3. Shift: half of the traffic now comes from intents the adapter never saw. No person
   acts: the drift check fires and names them, the retrain curates, trains from
   production's weights and publishes, the canary gates the candidate and promotes it.
4. Report: held-out queries of the old and the new intents through the gateway alias,
   before and after; one HTML page with the plots (``<home>/demo/reports/demo.html``),
   a terminal summary and ``FIGURE`` lines.

Nothing in it is specific to banking77: ``--data`` takes any intent dataset in the same
layout (``train.csv`` and ``test.csv`` with ``text`` and ``category``, and
``categories.json``); intents are drawn at random (seeded), and every size scales with
the number of intents.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.rule import Rule

from tuneloop.cli.common import console, fail, settings_of
from tuneloop.runtime.settings import CONFIG_ENV, Settings, load_settings
from tuneloop.services.demo import banking77
from tuneloop.services.demo.banking77 import Query


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


@dataclass(frozen=True)
class Scenario:
    """The demo's sizes; ``--quick`` is the same path with fewer intents and examples."""

    old_share: float  # of all intents, served before the shift
    max_old: int
    new_intents: int
    history_per_intent: int  # labelled events the app sent before tuneloop
    golden_per_intent: int
    heldout_per_intent: int  # test-split queries per intent for before/after
    new_share: float  # of traffic after the shift
    steady_s: float
    users: int
    rate: float  # user requests per second, all users together
    label_share: float  # answers an agent labels
    drift_window: int  # current window of the drift check, events
    shift_timeout_s: float
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def _cores(first: int, end: int) -> str:
    return str(first) if end - first == 1 else f"{first}-{end - 1}"


def _demo_settings(window: int, canary_window_s: int, min_requests: int,
                   min_ratings: int) -> dict[str, dict[str, Any]]:
    from tuneloop.training.config import CONFIGS_DIR

    recipe = CONFIGS_DIR / "demo.yaml"
    # On a CPU, vLLM and training each get their own cores: threads of the two spinning on
    # the same core slow both several times over (see tuneloop/runtime/cpu.py).
    cores = os.cpu_count() or 1
    split = {"serving": {"engine_cores": _cores(0, max(1, cores // 2))},
             "training": {"cpu_cores": _cores(max(1, cores // 2), cores)}} if cores > 1 else {}
    return _merge(split, {
        # Checks often enough to see a shift within a minute of enough traffic.
        "drift": {"interval_s": 60, "current_window_events": window},
        # A short live window sized to the traffic a CPU serves; half the users see it.
        # An inconclusive offline improvement is looked at again within minutes, on the
        # labelled answers that arrived meanwhile.
        "canary": {"window_s": canary_window_s, "max_window_s": 900, "poll_s": 10,
                   "offline_recheck_s": 90, "fresh_max_examples": 80,
                   "min_requests": min_requests, "min_ratings": min_ratings},
        "serving": {"canary_share": 0.5},
        # The demo shows the drift path; a retrain on label count alone is off.
        "loop": {"cooldown_s": 240, "retrain_min_new_labels": 0},
        # A larger test split: a small dataset still gives the offline gate enough new
        # examples to show an improvement (the golden set holds only what production knew).
        # A retrain continues from production: 10 train examples of each label it knows
        # keep that label (bench/RESULTS.md, forgetting), and the steps go to the new ones.
        "curation": {"split": [0.7, 0.1, 0.2], "known_label_train_cap": 10},
        "training": {"config": str(recipe)},
    })


FULL = Scenario(old_share=0.5, max_old=40, new_intents=10, history_per_intent=24,
                golden_per_intent=5, heldout_per_intent=10, new_share=0.5, steady_s=120,
                users=4, rate=1.5, label_share=0.6, drift_window=200, shift_timeout_s=4200,
                settings=_demo_settings(200, 90, 40, 20))
QUICK = Scenario(old_share=0.5, max_old=6, new_intents=3, history_per_intent=40,
                 golden_per_intent=5, heldout_per_intent=20, new_share=0.5, steady_s=70,
                 users=4, rate=1.0, label_share=0.6, drift_window=180, shift_timeout_s=2400,
                 settings=_demo_settings(180, 45, 25, 12))


def _toml(data: dict[str, Any]) -> str:
    """The few TOML shapes settings use: tables of scalars and lists."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    top = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
              for k, v in data.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


def demo(
    ctx: typer.Context,
    quick: bool = typer.Option(False, "--quick", help="Fewer intents and examples, same path."),
    data: Path | None = typer.Option(
        None, "--data", help="Intent dataset folder (train.csv, test.csv, categories.json); "
        "default: the bundled banking77."),
    seed: int = typer.Option(0, "--seed", help="Which intents are old and new."),
    keep_up: bool = typer.Option(True, "--keep-up/--down", help="Leave the stack running."),
) -> None:
    """Run the loop unattended on the embedded stack: bootstrap, steady traffic, a shift."""
    scenario = QUICK if quick else FULL
    user = settings_of(ctx)
    home = Path(user.home) / "demo"
    # The user's settings file, with the demo's sizes over it, in the demo's own home.
    base: dict[str, Any] = {}
    if os.environ.get(CONFIG_ENV) and Path(os.environ[CONFIG_ENV]).exists():
        base = tomllib.loads(Path(os.environ[CONFIG_ENV]).read_text())
    _tuneloop(ctx, home, "down")
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    config = home / "demo.toml"
    config.write_text(_toml(_merge(base, scenario.settings)))
    os.environ[CONFIG_ENV] = str(config)
    os.environ["TUNELOOP_HOME"] = str(home)
    settings = load_settings({"home": home})
    try:
        result = run_scenario(ctx, settings, scenario, data, seed)
    finally:
        if not keep_up:
            _tuneloop(ctx, home, "down")
    _summary(settings, result)


def _tuneloop(ctx: typer.Context, home: Path, *args: str) -> None:
    """Another tuneloop command in this process, on the demo's home, with the root flags."""
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


@dataclass
class Result:
    """What the demo measured; written to ``reports/demo.json``."""

    dataset: str
    old_intents: list[str]
    new_intents: list[str]
    bootstrap_version: str | None = None
    promoted_version: str | None = None
    shift_at: str | None = None
    promoted_at: str | None = None
    shift_to_promotion_s: float | None = None
    steady_drift_alarms: int = 0
    steady_retrains: int = 0
    drift_clusters: list[dict[str, Any]] = field(default_factory=list)
    named_new_intents: list[str] = field(default_factory=list)
    before: dict[str, dict[str, float]] = field(default_factory=dict)
    after: dict[str, dict[str, float]] = field(default_factory=dict)
    # Old intents' macro-F1 change in points with its paired-bootstrap interval, and the
    # p-value that it fell by more than the goal's margin (small: a real regression).
    old_intents_delta: dict[str, Any] = field(default_factory=dict)
    served_failures: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    report: str | None = None
    missed: list[str] = field(default_factory=list)


def _pick(pool: list[Query], intents: list[str], per_intent: int, skip: int = 0) -> list[Query]:
    out: list[Query] = []
    for name in intents:
        out += [q for q in pool if q.intent == name][skip:skip + per_intent]
    return out


def run_scenario(ctx: typer.Context, settings: Settings, sc: Scenario, data: Path | None,
                 seed: int) -> Result:
    from tuneloop.services.demo.simulation import SimulatedUsers

    intents = banking77.intents(data)
    rng = random.Random(seed)
    rng.shuffle(intents)
    n_old = min(sc.max_old, max(2, round(len(intents) * sc.old_share)))
    old, new = intents[:n_old], intents[n_old:n_old + sc.new_intents]
    train, test = banking77.load("train", data), banking77.load("test", data)
    # Queries in a random order: a data file's order (by collection batch, say) must not
    # make the history and the later traffic of the same intents look different.
    random.Random(seed + 2).shuffle(train)
    result = Result(str(data or banking77.data_dir()), old, new)
    home = Path(settings.home)
    t_start = time.monotonic()

    console.print(Rule("1. bootstrap: the embedded stack (tansu, Prefect, worker, ingest, "
                       "gateway + vLLM)"))
    _tuneloop(ctx, home, "up")
    result.timings["up_s"] = time.monotonic() - t_start

    history = _pick(train, old, sc.history_per_intent)
    random.Random(seed + 3).shuffle(history)  # the app's history interleaves its intents
    console.print(f"the production app's history: {len(history):,} labelled queries over "
                  f"{len(old)} intents, through the producer SDK")
    _send_history(settings, history, seed)
    _wait_for_rows(settings, len(history))
    _tuneloop(ctx, home, "golden", "add", "--count", str(sc.golden_per_intent * len(old)))

    # Steady traffic: other queries of the same intents.
    steady_queries = _pick(train, old, 10_000, skip=sc.history_per_intent)
    users = SimulatedUsers(settings, steady_queries, workers=sc.users, rate=sc.rate,
                           label_share=sc.label_share)
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

    heldout_old = _pick(test, old, sc.heldout_per_intent)
    heldout_new = _pick(test, new, sc.heldout_per_intent)
    console.print(f"held-out queries through the alias, before: {len(heldout_old)} old-intent, "
                  f"{len(heldout_new)} new-intent")
    result.before, answers_before = _measure(settings, heldout_old, heldout_new)
    _print_scores("before", result.before)
    # Everything from the first promotion to the shift is steady traffic.
    alarms, retrains = _steady_activity(settings, _promoted_at(settings, first) if first
                                        else datetime.now(UTC))
    result.steady_drift_alarms, result.steady_retrains = alarms, retrains
    console.print(f"steady traffic since the first promotion: {alarms} drift alarm(s), "
                  f"{retrains} retrain(s)")

    console.print(Rule(f"3. shift: {sc.new_share:.0%} of traffic from {len(new)} intents the "
                       "adapter never saw; nobody acts"))
    shifted = _mix(_pick(train, new, 10_000), steady_queries, sc.new_share, seed)
    users = SimulatedUsers(settings, shifted, workers=sc.users, rate=sc.rate,
                           label_share=sc.label_share)
    shift_at = datetime.now(UTC)
    result.shift_at = shift_at.isoformat()
    t_shift = time.monotonic()
    with users.running(ingest=False):
        promoted = _wait_for_promotion(settings, first, sc.shift_timeout_s, "the loop")
    result.served_failures += len(users.failures)
    if promoted is None:
        result.missed.append(f"no promotion within {sc.shift_timeout_s:.0f} s of the shift")
    else:
        result.promoted_version = promoted
        at = _promoted_at(settings, promoted)
        result.promoted_at = at.isoformat()
        result.shift_to_promotion_s = round((at - shift_at).total_seconds(), 1)
    result.timings["shift_s"] = time.monotonic() - t_shift
    result.drift_clusters, result.named_new_intents = _drift_findings(settings, shift_at, new)

    console.print(Rule("4. after: the same held-out queries through the alias"))
    result.after, answers_after = _measure(settings, heldout_old, heldout_new)
    _print_scores("after", result.after)
    result.old_intents_delta = _old_delta(heldout_old, answers_before["old intents"],
                                          answers_after["old intents"])
    result.timings["total_s"] = time.monotonic() - t_start
    _goals(result)
    from tuneloop.cli.demo_report import write_report

    result.report = str(write_report(settings, asdict(result)))
    (home / "reports" / "demo.json").write_text(json.dumps(asdict(result), indent=2))
    return result


def _mix(new: list[Query], old: list[Query], share: float, seed: int) -> list[Query]:
    """A traffic list with ``share`` of queries from ``new``, shuffled."""
    rng = random.Random(seed + 1)
    n = max(len(new), len(old))
    n_new = max(1, round(n * share))
    picked = [new[i % len(new)] for i in range(n_new)] + \
        [old[i % len(old)] for i in range(n - n_new)]
    rng.shuffle(picked)
    return picked


def _send_history(settings: Settings, queries: list[Query], seed: int) -> None:
    from tuneloop.services.feedback.producer import FeedbackProducer

    events = list(banking77.to_events(queries, app=settings.serving.alias, seed=seed,
                                      accuracy=0.0, spacing_s=0.01))
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
            if Store(settings.db_path, 30).counts().get("feedback", 0) >= n:
                return
            time.sleep(1)
    raise fail(f"the ingest landed fewer than {n} events in {timeout_s:.0f} s; "
               "see `tuneloop status` and <home>/logs/ingest.log")


def _production(settings: Settings) -> str | None:
    from tuneloop.services.store.database import Store

    with Store(settings.db_path, 60).connect() as con:
        rows = con.execute("SELECT version FROM adapters WHERE state = 'production' "
                           "ORDER BY created_at DESC LIMIT 1").fetchall()
    return str(rows[0][0]) if rows else None


def _wait_for_promotion(settings: Settings, current: str | None, timeout_s: float,
                        who: str) -> str | None:
    """Wait until production is a version other than ``current``; narrate the decisions."""
    from tuneloop.services.canary.store import list_decisions
    from tuneloop.services.store.database import Store, StoreBusyError

    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    with console.status(f"waiting for {who} to promote a new version...") as status:
        while time.monotonic() < deadline:
            try:
                with Store(settings.db_path, 60).connect() as con:
                    decisions = list_decisions(con, 10)
                version = _production(settings)
            except StoreBusyError:
                continue  # a long write; look again
            for d in reversed(decisions):
                if d["decision_id"] in seen:
                    continue
                seen.add(d["decision_id"])
                if d["created_at"].timestamp() < time.time() - (time.monotonic() - started) - 5:
                    continue
                colour = {"promote": "green", "pass": "green", "trained": "cyan",
                          "reject": "red", "rollback": "red"}.get(d["verdict"], "yellow")
                console.print(f"  {d['created_at']:%H:%M:%S} [{colour}]{d['stage']} "
                              f"{d['verdict']}[/]: {d['reason'][:150]}", highlight=False)
            if version is not None and version != current:
                return version
            status.update(f"waiting for {who} to promote a new version... "
                          f"{time.monotonic() - started:.0f} s")
            time.sleep(5)
    return None


def _promoted_at(settings: Settings, version: str) -> datetime:
    from tuneloop.services.store.database import Store

    with Store(settings.db_path, 60).connect() as con:
        at = con.execute("SELECT max(occurred_at) FROM deployments WHERE adapter_version = ? "
                         "AND to_state = 'production'", [version]).fetchall()[0][0]
    return at if at is not None else datetime.now(UTC)


def _steady_activity(settings: Settings, since: datetime) -> tuple[int, int]:
    from tuneloop.services.store.database import Store

    with Store(settings.db_path, 60).connect() as con:
        alarms = con.execute("SELECT count(*) FROM drift_reports WHERE drifted AND "
                             "created_at >= ?", [since]).fetchall()[0][0]
        retrains = con.execute("SELECT count(*) FROM canary_decisions WHERE stage = 'retrain' "
                               "AND verdict IN ('start', 'trained') AND created_at >= ?",
                               [since]).fetchall()[0][0]
    return int(alarms), int(retrains)


def _drift_findings(settings: Settings, since: datetime, new: list[str]
                    ) -> tuple[list[dict[str, Any]], list[str]]:
    """The first drift report after the shift: its clusters, and which new intents it named."""
    from tuneloop.services.store.database import Store

    with Store(settings.db_path, 60).connect() as con:
        rows = con.execute("SELECT clusters FROM drift_reports WHERE drifted AND created_at >= ? "
                           "ORDER BY created_at LIMIT 1", [since]).fetchall()
    if not rows:
        return [], []
    clusters = json.loads(rows[0][0]) if isinstance(rows[0][0], str) else list(rows[0][0])
    # A cluster is new, grew, or holds labels the reference never had ("new labels").
    named = sorted({lab["label"] for c in clusters if c["status"] in ("new", "grew")
                    for lab in c.get("labels", []) if lab["label"] in new}
                   | {label for c in clusters for label in c.get("new_labels", [])
                      if label in new})
    return clusters, named


def _measure(settings: Settings, old: list[Query], new: list[Query]
             ) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    """Accuracy and macro-F1 of the alias's answers, per group, as end users get them;
    and the answers."""
    from openai import OpenAI

    from tuneloop.services.evaluation.metrics import evaluate_predictions

    client = OpenAI(base_url=f"{settings.serving.gateway_url}/v1", api_key="unused",
                    max_retries=3, timeout=settings.serving.upstream_timeout_s)

    def ask(q: Query) -> str:
        messages: Any = [m.model_dump() for m in banking77.chat(q.text)]
        answer = client.chat.completions.create(
            model=settings.serving.alias, messages=messages, max_tokens=16, temperature=0,
            user="demo-evaluation")
        return answer.choices[0].message.content or ""

    out: dict[str, dict[str, float]] = {}
    answers: dict[str, list[str]] = {}
    with ThreadPoolExecutor(8) as pool, console.status("asking the alias..."):
        for name, queries in (("old intents", old), ("new intents", new)):
            answers[name] = list(pool.map(ask, queries))
            report = evaluate_predictions(answers[name], [q.intent for q in queries],
                                          [q.intent for q in queries])
            out[name] = {"accuracy": report.accuracy or 0.0, "macro_f1": report.macro_f1 or 0.0}
    return out, answers


def _old_delta(queries: list[Query], before: list[str], after: list[str]) -> dict[str, Any]:
    """The old intents' macro-F1 change on the same held-out queries, in points, with a 95%
    paired-bootstrap interval: a few hundred queries move by a few points between two
    adapters that are equally good, so the change is read with its interval."""
    from tuneloop.services.canary.core import macro_f1_bootstrap

    boot = macro_f1_bootstrap([q.intent for q in queries], before, after,
                              OLD_DROP_POINTS / 100, alpha=0.05)
    return {"points": round(100 * boot.delta, 2),
            "ci95": [round(100 * boot.low, 2), round(100 * boot.high, 2)],
            "margin_points": OLD_DROP_POINTS, "p_fell_beyond_margin": boot.p_beyond_margin,
            "queries": len(queries)}


def _print_scores(when: str, scores: dict[str, dict[str, float]]) -> None:
    console.print("  " + "; ".join(f"{group} {when}: accuracy {s['accuracy']:.3f}, macro-F1 "
                                   f"{s['macro_f1']:.3f}" for group, s in scores.items()))


NEW_F1_GOAL, NEW_F1_STRETCH, OLD_DROP_POINTS, SHIFT_GOAL_S = 0.70, 0.85, 2.0, 1200.0


def _goals(result: Result) -> None:
    new_after = result.after.get("new intents", {}).get("macro_f1", 0.0)
    delta = 100 * (result.after.get("old intents", {}).get("macro_f1", 0.0)
                   - result.before.get("old intents", {}).get("macro_f1", 0.0))
    if new_after < NEW_F1_GOAL:
        result.missed.append(f"new-intent macro-F1 {new_after:.3f} < {NEW_F1_GOAL}")
    if delta < -OLD_DROP_POINTS:
        ci = result.old_intents_delta.get("ci95") or [float("nan")] * 2
        result.missed.append(f"old-intent macro-F1 fell {-delta:.1f} points (> {OLD_DROP_POINTS}; "
                             f"95% interval {ci[0]:+.1f} to {ci[1]:+.1f})")
    if result.shift_to_promotion_s is not None and result.shift_to_promotion_s > SHIFT_GOAL_S:
        result.missed.append(f"shift to promotion {result.shift_to_promotion_s:.0f} s "
                             f"(> {SHIFT_GOAL_S:.0f} s)")
    if result.steady_drift_alarms or result.steady_retrains:
        result.missed.append(f"steady traffic raised {result.steady_drift_alarms} drift alarm(s) "
                             f"and {result.steady_retrains} retrain(s)")


def _summary(settings: Settings, r: Result) -> None:
    console.print(Rule("summary"))
    console.print(f"old intents ({len(r.old_intents)}): {', '.join(r.old_intents)}")
    console.print(f"new intents ({len(r.new_intents)}): {', '.join(r.new_intents)}")
    console.print(f"first adapter {r.bootstrap_version}; after the shift "
                  f"{r.promoted_version or 'nothing promoted'}"
                  + (f", {r.shift_to_promotion_s:.0f} s from shift to promotion"
                     if r.shift_to_promotion_s is not None else ""))
    console.print(f"the drift report named {len(r.named_new_intents)} of {len(r.new_intents)} "
                  f"new intents: {', '.join(r.named_new_intents) or '-'}")
    _print_scores("before", r.before)
    _print_scores("after", r.after)
    if r.old_intents_delta:
        d = r.old_intents_delta
        console.print(f"  old intents' macro-F1 change: {d['points']:+.1f} points, 95% interval "
                      f"{d['ci95'][0]:+.1f} to {d['ci95'][1]:+.1f} ({d['queries']} queries)")
    console.print(f"failed user requests: {r.served_failures}")
    if r.missed:
        console.print("[bold red]missed:[/] " + "; ".join(r.missed))
    else:
        console.print("[bold green]every goal met[/]")
    console.print(f"report: {r.report}")
    console.print(f"Prefect UI: {settings.prefect.api_url.removesuffix('/api')}; "
                  f"`tuneloop --home {settings.home} status`; "
                  f"`tuneloop --home {settings.home} down` stops the stack.")
    before_new = r.before.get("new intents", {}).get("macro_f1", 0.0)
    after_new = r.after.get("new intents", {}).get("macro_f1", 0.0)
    delta = 100 * (r.after.get("old intents", {}).get("macro_f1", 0.0)
                   - r.before.get("old intents", {}).get("macro_f1", 0.0))
    print(f"FIGURE new_intents_macro_f1_before={before_new:.3f}")  # noqa: T201
    print(f"FIGURE new_intents_macro_f1_after={after_new:.3f}")  # noqa: T201
    print(f"FIGURE old_intents_macro_f1_delta={delta:.1f}")  # noqa: T201
    shift = r.shift_to_promotion_s
    print(f"FIGURE shift_to_promotion_s={'nan' if shift is None else f'{shift:.0f}'}")  # noqa: T201
