"""The ``canary`` flow: a candidate adapter earns production traffic, or never gets it.

Wiring only; the tests are in ``tuneloop.services.canary.core``, the I/O in ``serving.canary``.

1. A deployment freeze stops everything: the candidate waits, untouched.
2. Offline gate (candidate state ``candidate``): golden set, then test split and the
   labelled events newer than the candidate's dataset, both versions through the
   gateway's internal route. Reject: the candidate is rejected and unloaded, never
   having served a user. Hold on the improvement alone: look again every
   ``canary.offline_recheck_s`` on the events that arrived, up to ``offline_looks``.
   Hold after that: it stays a candidate.
3. Live gate (state ``canary``): a sticky share of users for a window, polled until a
   verdict; then promote or roll back through the gateway.

A crash is safe at any point: production keeps its traffic throughout (the canary only
ever has its share), and a rerun finds the candidate's state in the registry and its
window start in ``canary_decisions``, so it resumes the same window. Only a full
verdict promotes. ``check_production`` is the nightly freeze check.
"""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from tuneloop.flows.common import rename_run
from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.canary import store as canary_store
from tuneloop.services.canary.core import Decision, Side, live_decision, only_improvement_holds
from tuneloop.services.canary.plots import plot_canary
from tuneloop.services.loop import metrics as loop_metrics
from tuneloop.services.registry.store import get_adapter
from tuneloop.services.store.database import Store
from tuneloop.serving import canary as ops
from tuneloop.serving import control

log = logging.getLogger(__name__)


def _store(settings: Settings) -> Store:
    return Store(settings.db_path, settings.store.lock_timeout_s)


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def resolve(settings: Settings, candidate: str | None) -> dict[str, Any]:
    """The candidate (default: the newest candidate or canary), its state, the incumbent."""
    with _store(settings).connect() as con:
        if candidate is None:
            rows = con.execute(
                "SELECT version FROM adapters WHERE state IN ('candidate', 'canary') AND name = "
                "? || '-' || version ORDER BY created_at DESC LIMIT 1",
                [settings.serving.alias]).fetchall()
            if not rows:
                raise ValueError("no candidate adapter to check; train one with `tuneloop train`")
            candidate = str(rows[0][0])
        adapter = get_adapter(con, candidate)
        freeze = canary_store.active_freeze(con)
        started = canary_store.live_started_at(con, candidate)
    route = control.registry_route(settings, settings.serving.alias)
    return {"candidate": candidate, "state": adapter.state, "incumbent": route.production,
            "freeze": freeze, "live_started_at": started}


@task(retries=1, retry_delay_seconds=10, cache_policy=NONE)
def offline(settings: Settings, candidate: str, incumbent: str | None, look: int = 1
            ) -> Decision:
    return ops.offline_gate(settings, candidate, incumbent, look)


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def record(settings: Settings, decision: Decision, sides: tuple[Side, Side] | None = None) -> str:
    """Store the decision and show it in Prefect with its comparison plot."""
    run_id = str(flow_run.get_id() or "")
    with _store(settings).connect() as con:
        decision_id = canary_store.record_decision(con, decision, run_id or None)
    loop_metrics.count_decision(settings.home, decision.stage, decision.verdict)
    if "live_s" in decision.figures:
        loop_metrics.record(settings.home, "canary", seconds=decision.figures["live_s"],
                            verdict=decision.verdict, candidate=decision.candidate)
    with _store(settings).connect() as con:
        offline_figures = decision.figures if decision.stage == "offline" else next(
            (d["figures"] for d in canary_store.list_decisions(con, 50, decision.candidate)
             if d["stage"] == "offline"), {})
    image = None
    per_label = offline_figures.get("golden_per_label")
    latencies = None
    if sides is not None:
        latencies = {"candidate": sides[0].latencies_s, "production": sides[1].latencies_s}
    if per_label or latencies:
        path = settings.home / "reports" / f"canary-{decision_id}.png"
        image = plot_canary(per_label, latencies, decision.reason[:120], path)
    create_markdown_artifact(key=_artifact_key(decision), markdown=describe(decision, image),
                             description=decision.reason[:250])
    log.info("canary decision %s: %s", decision_id, decision.reason)
    return decision_id


def describe(decision: Decision, image: Path | None) -> str:
    """A decision as Markdown: who, the verdict, every check with its statistic and p-value."""
    lines = [f"## {decision.stage} gate: **{decision.verdict}**", "",
             f"candidate **{decision.candidate or 'base'}** vs incumbent "
             f"**{decision.incumbent or 'base model'}**", "",
             "| check | outcome | statistic | p-value | threshold | detail |",
             "|---|---|---|---|---|---|"]
    for c in decision.checks:
        stat = "-" if c.statistic is None else f"{c.statistic:.4g}"
        p = "-" if c.p_value is None else f"{c.p_value:.3g}"
        lines.append(f"| {c.name} | {c.outcome} | {stat} | {p} | {c.threshold} | {c.detail} |")
    if image is not None:
        data = base64.b64encode(image.read_bytes()).decode()
        lines += ["", f"![comparison](data:image/png;base64,{data})", "", f"plot: `{image}`"]
    return "\n".join(lines)


def _artifact_key(decision: Decision) -> str:
    who = (decision.candidate or decision.incumbent or "base").lower()
    return f"canary-{decision.stage}-{who}".replace("_", "-")


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def go_live(settings: Settings, candidate: str, incumbent: str | None) -> float:
    started = ops.start_live(settings, candidate, "passed the offline gate; live window opens")
    return mark_start(settings, candidate, incumbent, started)


def mark_start(settings: Settings, candidate: str, incumbent: str | None, started: float) -> float:
    """Record when the live window opened: a rerun resumes from it."""
    start = Decision("live", candidate, incumbent, "start",
                     figures={"started_at": started,
                              "canary_share": settings.serving.canary_share})
    with _store(settings).connect() as con:
        canary_store.record_decision(con, start, str(flow_run.get_id() or "") or None)
    return started


@task(retries=3, retry_delay_seconds=5, cache_policy=NONE)
def look(settings: Settings, candidate: str, incumbent: str | None,
         started_at: float) -> tuple[Decision, tuple[Side, Side], bool]:
    """One look at the window: the live verdict so far, the sides, and whether frozen."""
    now = time.time()
    cand, inc = ops.window(settings, candidate, incumbent, started_at, now)
    decision = live_decision(candidate, incumbent, cand, inc, now - started_at, settings.canary)
    with _store(settings).connect() as con:
        frozen = canary_store.active_freeze(con) is not None
    return decision, (cand, inc), frozen


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def conclude(settings: Settings, decision: Decision) -> None:
    ops.conclude(settings, decision)


def _run_name() -> str:
    params = flow_run.get_parameters() or {}
    return f"canary: {params.get('candidate') or 'newest candidate'}"


@flow(name="canary", flow_run_name=_run_name, log_prints=False)
def canary(candidate: str | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """Gate ``candidate`` (default: the newest candidate or canary) offline, then live.

    Returns the final verdict (promote, rollback, reject, hold or frozen) and the figures.
    """
    settings = settings or load_settings()
    plan = resolve(settings, candidate)
    candidate, incumbent = plan["candidate"], plan["incumbent"]
    if plan["state"] not in ("candidate", "canary"):
        # Already decided (a repeated trigger, or a rerun after the verdict): nothing to do.
        reason = f"adapter {candidate} is {plan['state']}: already decided"
        rename_run(f"canary: {candidate}: already {plan['state']}")
        return {"candidate": candidate, "verdict": "none", "reason": reason}
    if plan["freeze"] is not None and plan["state"] == "candidate":
        decision = Decision("offline", candidate, incumbent, "frozen",
                            figures={"freeze": plan["freeze"]["reason"]})
        record(settings, decision)
        rename_run(f"canary: {candidate}: frozen")
        return {"candidate": candidate, "verdict": "frozen", "reason": plan["freeze"]["reason"]}
    if plan["state"] == "candidate":
        decision = offline(settings, candidate, incumbent)
        looks = settings.canary.offline_looks
        while only_improvement_holds(decision) and decision.figures.get("look", looks) < looks:
            # Only the improvement is unsettled: look again on the labelled events that
            # arrive meanwhile (an automatic retrain waits for the looks).
            seen = int(decision.figures["look"])
            decision.figures["next_look_at"] = time.time() + settings.canary.offline_recheck_s
            record(settings, decision)
            rename_run(f"canary: {candidate} vs {incumbent or 'base'} -> hold, look {seen}/"
                       f"{looks}; next in {settings.canary.offline_recheck_s:.0f} s")
            time.sleep(settings.canary.offline_recheck_s)
            decision = offline(settings, candidate, incumbent, seen + 1)
        record(settings, decision)
        if decision.verdict == "reject":
            ops.reject_candidate(settings, candidate, decision.reason)
        if decision.verdict != "pass":
            rename_run(f"canary: {candidate} vs {incumbent or 'base'} -> {decision.verdict} "
                       "(offline)")
            return {"candidate": candidate, "verdict": decision.verdict,
                    "reason": decision.reason, "figures": decision.figures}
        started = go_live(settings, candidate, incumbent)
    else:
        # Already the canary; with no recorded start (a crash right after the flip) the
        # window opens now.
        started = plan["live_started_at"] or mark_start(settings, candidate, incumbent,
                                                        time.time())
        log.info("canary %s: resuming the live window opened at %.0f", candidate, started)
    while True:
        decision, sides, frozen = look(settings, candidate, incumbent, started)
        if decision.verdict == "promote" and frozen:
            decision.verdict = "hold"
            if time.time() - started >= settings.canary.max_window_s:
                decision.verdict = "rollback"
        if decision.verdict != "hold":
            break
        time.sleep(settings.canary.poll_s)
    decision.figures["live_s"] = round(time.time() - started, 2)
    if settings.serving.shadow_share > 0:
        decision.figures["shadow"] = ops.shadow_summary(settings, candidate, started)
    conclude(settings, decision)
    record(settings, decision, sides)
    rename_run(f"canary: {candidate} vs {incumbent or 'base'} -> {decision.verdict}")
    return {"candidate": candidate, "verdict": decision.verdict, "reason": decision.reason,
            "figures": decision.figures}


@flow(name="check-production", log_prints=False)
def check_production(settings: Settings | None = None) -> dict[str, Any]:
    """Production on the golden set; freeze promotions when it fell below the threshold."""
    settings = settings or load_settings()
    decision = ops.production_check(settings)
    if decision.verdict == "frozen":
        with _store(settings).connect() as con:
            if canary_store.active_freeze(con) is None:
                canary_store.freeze(con, decision.reason, decision.figures)
    record(settings, decision)
    return {"verdict": decision.verdict, "reason": decision.reason, "figures": decision.figures}
