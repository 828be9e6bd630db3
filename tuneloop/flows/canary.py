"""The ``canary`` flow: a candidate adapter earns production traffic, or never gets it.

Wiring only: the decisions are in ``tuneloop.services.canary`` (``core``, ``live``), the
gates' I/O in ``tuneloop.serving.canary``, the records in
``tuneloop.services.canary.records``.

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

Both flows take plain parameters (Prefect stores them with each run and shows them in
its UI) and load the settings themselves: ``overrides`` maps dotted setting names
(``"canary.window_s"``) to values; a secret such as ``serving.admin_key`` is refused
there (:func:`tuneloop.flows.common.flow_settings`) and comes from the environment or
the settings file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, TypedDict

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from tuneloop.flows.common import flow_settings, image_markdown, rename_run
from tuneloop.runtime.settings import Settings
from tuneloop.services.canary import records
from tuneloop.services.canary import store as canary_store
from tuneloop.services.canary.core import Decision, Plan, another_look
from tuneloop.services.canary.live import Side
from tuneloop.services.store.database import AnyStore, Store
from tuneloop.serving.canary import live, offline, production

log = logging.getLogger(__name__)


class CanaryResult(TypedDict, total=False):
    """What a canary run decided; ``figures`` only when a gate ran."""

    candidate: str
    verdict: str  # none | frozen | pass | reject | hold | promote | rollback
    reason: str
    figures: dict[str, Any]


class CheckResult(TypedDict):
    """What the production check decided."""

    verdict: str  # ok | frozen
    reason: str
    figures: dict[str, Any]


def _run_id() -> str | None:
    return str(flow_run.get_id() or "") or None



@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def resolve(store: AnyStore, alias: str, candidate: str | None) -> Plan:
    """The candidate (default: the newest candidate or canary), its state, the incumbent."""
    with store.connect() as con:
        return canary_store.gate_plan(con, alias, candidate)


@task(retries=1, retry_delay_seconds=10, cache_policy=NONE)
def offline_gate(settings: Settings, plan: Plan, look: int = 1) -> Decision:
    return offline.offline_gate(settings, plan, look)


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def record(store: AnyStore, home: Path, decision: Decision,
           sides: tuple[Side, Side] | None = None) -> str:
    """Store the decision and show it in Prefect with its comparison plot."""
    got = records.record(store, home, decision, _run_id(), sides)
    create_markdown_artifact(key=_artifact_key(decision),
                             markdown=records.describe(decision)
                             + image_markdown(got.image, "comparison"),
                             description=decision.reason[:250])
    return got.decision_id


def _artifact_key(decision: Decision) -> str:
    who = (decision.candidate or decision.incumbent or "base").lower()
    return f"canary-{decision.stage}-{who}".replace("_", "-")


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def conclude_offline(settings: Settings, decision: Decision) -> float | None:
    return offline.conclude_offline(settings, decision, _run_id())


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def resume(settings: Settings, plan: Plan) -> float:
    return live.resume(settings, plan, _run_id())


@task(retries=3, retry_delay_seconds=5, cache_policy=NONE)
def look(settings: Settings, plan: Plan, started_at: float
         ) -> tuple[Decision, tuple[Side, Side]]:
    return live.look(settings, plan, started_at)


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def conclude(settings: Settings, decision: Decision, started_at: float) -> Decision:
    return live.conclude(settings, decision, started_at)


def _run_name() -> str:
    params = flow_run.get_parameters() or {}
    return f"canary: {params.get('candidate') or 'newest candidate'}"


@flow(name="canary", flow_run_name=_run_name, log_prints=False)
def canary(candidate: str | None = None,
           overrides: dict[str, Any] | None = None) -> CanaryResult:
    """Gate ``candidate`` (default: the newest candidate or canary) offline, then live.

    ``overrides``: dotted setting names to values (``{"canary.window_s": 60}``), never a
    secret. Returns the final verdict (promote, rollback, reject, hold or frozen) and
    the figures.
    """
    settings = flow_settings(overrides)
    store = Store.of(settings)
    plan = resolve(store, settings.serving.alias, candidate)
    who = f"canary: {plan.candidate}"
    if plan.step == "done":
        rename_run(f"{who}: already {plan.state}")
        return {"candidate": plan.candidate, "verdict": "none",
                "reason": f"adapter {plan.candidate} is {plan.state}: already decided"}
    if plan.step == "frozen":
        record(store, settings.home, plan.frozen())
        rename_run(f"{who}: frozen")
        return {"candidate": plan.candidate, "verdict": "frozen", "reason": plan.freeze or ""}
    who += f" vs {plan.incumbent or 'base'}"
    if plan.step == "offline":
        decision = _offline(settings, store, plan, who)
        started = conclude_offline(settings, decision)
        if started is None:
            rename_run(f"{who} -> {decision.verdict} (offline)")
            return _result(decision)
    else:
        started = resume(settings, plan)
    decision, sides = _live(settings, plan, started)
    decision = conclude(settings, decision, started)
    record(store, settings.home, decision, sides)
    rename_run(f"{who} -> {decision.verdict}")
    return _result(decision)


def _offline(settings: Settings, store: AnyStore, plan: Plan, who: str) -> Decision:
    """The offline gate's verdict after as many looks as it takes (recorded)."""
    decision = offline_gate(settings, plan)
    while (next_look := another_look(decision, settings.canary)) is not None:
        # Only the improvement is unsettled: look again on the labelled events that
        # arrive meanwhile (an automatic retrain waits for the looks).
        record(store, settings.home, decision)
        rename_run(f"{who} -> hold, look {next_look - 1}/{settings.canary.offline_looks}; "
                   f"next in {settings.canary.offline_recheck_s:.0f} s")
        time.sleep(settings.canary.offline_recheck_s)
        decision = offline_gate(settings, plan, next_look)
    record(store, settings.home, decision)
    return decision


def _live(settings: Settings, plan: Plan, started: float
          ) -> tuple[Decision, tuple[Side, Side]]:
    """Look at the live window every ``canary.poll_s`` until its verdict is final."""
    while True:
        decision, sides = look(settings, plan, started)
        if decision.verdict != "hold":
            return decision, sides
        time.sleep(settings.canary.poll_s)


def _result(decision: Decision) -> CanaryResult:
    return {"candidate": decision.candidate or "", "verdict": decision.verdict,
            "reason": decision.reason, "figures": decision.figures}


@task(retries=1, retry_delay_seconds=10, cache_policy=NONE)
def production_check(settings: Settings) -> Decision:
    return production.check_production(settings)


@flow(name="check-production", log_prints=False)
def check_production(overrides: dict[str, Any] | None = None) -> CheckResult:
    """Production on the golden set; freeze promotions when it fell below the threshold.

    ``overrides``: dotted setting names to values, never a secret.
    """
    settings = flow_settings(overrides)
    decision = production_check(settings)
    record(Store.of(settings), settings.home, decision)
    return {"verdict": decision.verdict, "reason": decision.reason, "figures": decision.figures}
