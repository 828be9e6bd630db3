"""The live gate: a sticky share of users for a window, then promote or roll back.

The window's figures come from two places cut at one instant: the gateway's records
(requests, errors, latencies per version) and the ratings in DuckDB, so requests and
ratings describe the same answers. The start of the window is itself a decision row,
so a rerun after a crash resumes the same window instead of opening a fresh, shorter one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import duckdb
from kafka.errors import KafkaError

from tuneloop.runtime.settings import Settings
from tuneloop.services.canary import store as canary_store
from tuneloop.services.canary.core import FAIL, Check, Decision, Plan
from tuneloop.services.canary.live import (
    Side,
    count_preferences,
    count_ratings,
    hold_while_frozen,
    judged_verdicts,
    live_decision,
    summarise_shadow,
)
from tuneloop.services.ingest.shadow import land_shadow_pairs
from tuneloop.services.store.database import Store, StoreBusyError
from tuneloop.serving import control

log = logging.getLogger(__name__)



def start(settings: Settings, candidate: str, incumbent: str | None, run_id: str | None) -> float:
    """Send the canary share of users to ``candidate`` and record when its window began.

    Raises ``RegistryError`` or :class:`tuneloop.serving.control.GatewayError` when the
    promotion to canary is refused or fails (then nothing is recorded).
    """
    control.promote(settings, candidate, "canary", "passed the offline gate; live window opens")
    return _mark_start(settings, candidate, incumbent, time.time(), run_id)


def resume(settings: Settings, plan: Plan, run_id: str | None) -> float:
    """When the window of a candidate that is already the canary began; with no recorded
    start (a crash right after the flip) it opens now."""
    if plan.live_started_at is not None:
        log.info("canary %s: resuming the live window opened at %.0f", plan.candidate,
                 plan.live_started_at)
        return plan.live_started_at
    return _mark_start(settings, plan.candidate, plan.incumbent, time.time(), run_id)


def _mark_start(settings: Settings, candidate: str, incumbent: str | None, started: float,
                run_id: str | None) -> float:
    decision = Decision("live", candidate, incumbent, "start",
                        figures={"started_at": started,
                                 "canary_share": settings.serving.canary_share})
    with Store.of(settings).connect() as con:
        canary_store.record_decision(con, decision, run_id)
    return started


def look(settings: Settings, plan: Plan, started_at: float) -> tuple[Decision, tuple[Side, Side]]:
    """One look at the window so far: the verdict (a freeze holds a promotion) and both
    sides (candidate, production). A window still holding whose candidate the gateway
    took off its route (it cannot load) is rolled back now, saying so: no more of its
    evidence would come."""
    now = time.time()
    cand, inc = window(settings, plan.candidate, plan.incumbent, started_at, now)
    decision = live_decision(plan.candidate, plan.incumbent, cand, inc, now - started_at,
                             settings.canary, per_token=settings.task.kind == "text")
    with Store.of(settings).connect() as con:
        frozen = canary_store.active_freeze(con) is not None
    decision = hold_while_frozen(decision, frozen, now - started_at, settings.canary)
    if decision.verdict == "hold" and (why := off_route(settings, plan.candidate)) is not None:
        decision = Decision(decision.stage, decision.candidate, decision.incumbent, "rollback",
                            [*decision.checks, Check("on the gateway's route", FAIL, None, None,
                                                     "the canary answers its share", why)],
                            decision.figures)
    return decision, (cand, inc)


def off_route(settings: Settings, candidate: str) -> str | None:
    """Why the gateway no longer routes to ``candidate`` because it cannot load it, or
    None (it does, it was moved by someone, or the gateway cannot answer now)."""
    try:
        state = control.GatewayAdmin(settings, timeout_s=10).state()
    except control.GatewayError:
        return None
    alias = settings.serving.alias
    route = next((r for r in state.get("routes", []) if r.get("alias") == alias), None)
    if route is None or route.get("candidate") == candidate:
        return None
    error = next((e.get("error") for e in state.get("errors", [])
                  if e.get("alias") == alias and e.get("version") == candidate), None)
    if error is None:
        return None
    return f"the gateway took {candidate} off {alias}'s route: it cannot load ({error})"


def window(settings: Settings, candidate: str, incumbent: str | None, started_at: float,
           until: float) -> tuple[Side, Side]:
    """Both versions' users from ``started_at`` to ``until``: the gateway's records,
    DuckDB's ratings. A gateway that cannot answer counts no requests (the window holds)."""
    try:
        seen = control.GatewayAdmin(settings).observations(
            settings.serving.alias, started_at, until)["versions"]
    except control.GatewayError as exc:
        log.warning("the gateway's window is unavailable (%s); counting no requests", exc)
        seen = {}
    sides = {}
    for version in (candidate, incumbent):
        got = seen.get(version or "base", {})
        sides[version] = Side(requests=int(got.get("requests", 0)),
                              errors=int(got.get("errors", 0)),
                              latencies_s=list(got.get("latencies_s", [])),
                              tokens=list(got.get("tokens", [])))
    for version, (rated, bad) in ratings(settings, [candidate, incumbent], started_at,
                                         until).items():
        sides[version].ratings, sides[version].bad_ratings = rated, bad
    sides[candidate].preferred, sides[incumbent].preferred = preferences(
        settings, candidate, incumbent, started_at, until)
    return sides[candidate], sides[incumbent]


def preferences(settings: Settings, candidate: str, incumbent: str | None, since: float,
                until: float) -> tuple[int, int]:
    """Side-by-side verdicts on answers given between ``since`` and ``until``: how many
    the candidate won and how many production won (see
    :func:`tuneloop.services.canary.live.count_preferences`)."""
    with Store.of(settings).connect() as con:
        verdicts = canary_store.gateway_preferences(con, settings.serving.alias,
                                                    datetime.fromtimestamp(since, UTC),
                                                    datetime.fromtimestamp(until, UTC))
    return count_preferences(verdicts, control.event_key(settings), candidate, incumbent,
                             settings.canary.max_ratings_per_user)


def ratings(settings: Settings, versions: Sequence[str | None], since: float,
            until: float | None = None) -> dict[str | None, tuple[int, int]]:
    """(rated answers, bad ones) per version for answers given between ``since`` and
    ``until`` (None: now), by the last verdict per answer (see
    :func:`tuneloop.services.canary.live.count_ratings`)."""
    end = until if until is not None else time.time() + 1
    with Store.of(settings).connect() as con:
        verdicts = canary_store.gateway_verdicts(con, settings.serving.alias,
                                                 datetime.fromtimestamp(since, UTC),
                                                 datetime.fromtimestamp(end, UTC))
    rows = judged_verdicts(verdicts, control.event_key(settings),
                           settings.canary.max_ratings_per_user)
    return count_ratings(rows, versions, settings.canary.bad_rating_below)


def shadow_summary(settings: Settings, candidate: str, since: float) -> dict[str, Any]:
    """How often the candidate's unseen answers agreed with production's, and, where a
    label or correction came later, which side was right."""
    try:
        land_shadow_pairs(settings, idle_polls=1)
    except (KafkaError, StoreBusyError, duckdb.Error) as exc:  # a report, not a gate
        log.warning("shadow pairs not landed, summarising those already stored: %s", exc)
    with Store.of(settings).connect() as con:
        rows = canary_store.shadow_answers(con, candidate, datetime.fromtimestamp(since, UTC))
    return summarise_shadow(rows)


def conclude(settings: Settings, decision: Decision, started_at: float) -> Decision:
    """Carry out a final live verdict: promote the canary, or take it off traffic.

    Returns the decision with the window's length (``live_s``) and, when the gateway
    shadows, the shadow summary. Raises ``ValueError`` for a verdict that is not final,
    ``RegistryError`` or :class:`tuneloop.serving.control.GatewayError` when the move is
    refused or fails.
    """
    candidate = decision.candidate
    if candidate is None or decision.verdict not in ("promote", "rollback"):
        raise ValueError(f"{decision.verdict!r} of {candidate!r} is not a final live verdict")
    figures = {**decision.figures, "live_s": round(time.time() - started_at, 2)}
    if settings.serving.shadow_share > 0:
        figures["shadow"] = shadow_summary(settings, candidate, started_at)
    if decision.verdict == "promote":
        control.promote(settings, candidate, "production", decision.reason)
    else:
        control.reject(settings, candidate, decision.reason)
    return Decision(decision.stage, candidate, decision.incumbent, decision.verdict,
                    decision.checks, figures)
