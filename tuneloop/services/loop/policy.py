"""The retrain guard: may an automatic retrain start now? Pure, no I/O.

The shell (:mod:`tuneloop.services.loop.store`) reads a :class:`LoopSnapshot` of the
registry, the decision log and the feedback; :func:`why_not_retrain` decides over it
and names the first reason to wait, in this order:

1. a retrain run again under a key that already started (a worker crash cut it short)
   goes on: it passed these checks when it started;
2. a canary is in its live window;
3. a candidate published in the last two hours awaits the canary's first verdict
   (with ``loop.canary_new_candidates``): a retrain now would compete with its offline
   gate for the machine, and may well be unnecessary;
4. a held candidate waits for more labelled events before its next offline look;
5. a retrain started in the last two hours has not finished;
6. a retrain a drift alarm started, when production changed since: the alarm was
   measured against the previous production's reference. It waits for a check against
   the new one (none yet: wait; one that found no drift: nothing to retrain for);
7. the last retrain finished within ``loop.cooldown_s``;
8. a label production never learned has fewer than ``loop.min_examples_per_new_label``
   examples, and came less than ``loop.new_label_wait_s`` ago.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from tuneloop.runtime.settings import LoopSettings

# A start or a candidate older than this is a leftover (a run that died without a
# record, a candidate the canary never got to), not something to wait for.
RECENT = timedelta(hours=2)
SHOWN_LABELS = 4


@dataclass(frozen=True)
class NewLabel:
    """A label production was not trained on, as the next curation would see it."""

    label: str
    examples: int
    first_seen: datetime


@dataclass(frozen=True)
class Published:
    """A candidate adapter and when it was published."""

    version: str
    created_at: datetime


@dataclass(frozen=True)
class HeldCandidate:
    """A candidate the offline gate found inconclusive and will look at again."""

    version: str
    next_look_at: datetime


@dataclass(frozen=True)
class DriftCheck:
    """When a drift check ran and whether it raised an alarm."""

    at: datetime
    drifted: bool


@dataclass(frozen=True)
class LoopSnapshot:
    """What the retrain guard looks at, read in one go from the store."""

    resumed: bool = False  # this run key already recorded its start
    canary: str | None = None  # the version in its live window
    unjudged: Published | None = None  # the newest candidate without an offline verdict
    held: tuple[HeldCandidate, ...] = ()  # candidates whose latest offline look asks again
    running_since: datetime | None = None  # the newest retrain start with no end recorded
    last_trained_at: datetime | None = None  # when the last retrain finished training
    new_labels: tuple[NewLabel, ...] = ()  # labels production's dataset lacks
    drift_triggered: bool = False  # a drift alarm started this retrain
    production: Published | None = None  # production's version and when it was promoted
    last_check: DriftCheck | None = None  # the newest drift check


Check = Callable[[LoopSnapshot, datetime, LoopSettings], str | None]


def why_not_retrain(snapshot: LoopSnapshot, now: datetime, cfg: LoopSettings) -> str | None:
    """Why an automatic retrain should not start at ``now`` (timezone-aware), or None.

    Never raises; the reasons and their order are in the module docstring.
    """
    if snapshot.resumed:
        return None
    for check in CHECKS:
        reason = check(snapshot, now, cfg)
        if reason:
            return reason
    return None


def _canary_live(snapshot: LoopSnapshot, now: datetime, cfg: LoopSettings) -> str | None:
    if snapshot.canary is None:
        return None
    return f"canary {snapshot.canary} is still in its live window"


def _candidate_unjudged(snapshot: LoopSnapshot, now: datetime,
                        cfg: LoopSettings) -> str | None:
    waiting = snapshot.unjudged
    if not cfg.canary_new_candidates or waiting is None or waiting.created_at <= now - RECENT:
        return None
    return f"candidate {waiting.version} is waiting for the canary's verdict"


def _candidate_held(snapshot: LoopSnapshot, now: datetime, cfg: LoopSettings) -> str | None:
    for held in snapshot.held:
        if held.next_look_at > now:
            return (f"candidate {held.version} is waiting for more labelled events before its "
                    f"next offline look at {held.next_look_at:%H:%M:%S}")
    return None


def _retrain_running(snapshot: LoopSnapshot, now: datetime, cfg: LoopSettings) -> str | None:
    started = snapshot.running_since
    if started is None or started <= now - RECENT:
        return None
    return f"a retrain started at {started:%H:%M:%S} is still running"


def _alarm_outdated(snapshot: LoopSnapshot, now: datetime, cfg: LoopSettings) -> str | None:
    production, check = snapshot.production, snapshot.last_check
    if not snapshot.drift_triggered or production is None:
        return None
    if check is None or check.at < production.created_at:
        return (f"production changed to {production.version} at "
                f"{production.created_at:%H:%M:%S}, after the drift alarm that started this "
                f"retrain; the next check measures against {production.version}'s reference")
    if not check.drifted:
        return (f"the newest drift check ({check.at:%H:%M:%S}), against production "
                f"{production.version}'s reference, found no drift")
    return None


def _cooling_down(snapshot: LoopSnapshot, now: datetime, cfg: LoopSettings) -> str | None:
    if snapshot.last_trained_at is None:
        return None
    age = (now - snapshot.last_trained_at).total_seconds()
    if age >= cfg.cooldown_s:
        return None
    return (f"cool-down: the last retrain finished {age:.0f} s ago "
            f"(loop.cooldown_s={cfg.cooldown_s})")


def _labels_thin(snapshot: LoopSnapshot, now: datetime, cfg: LoopSettings) -> str | None:
    return waiting_for_labels(snapshot.new_labels, now, cfg)


def waiting_for_labels(new_labels: tuple[NewLabel, ...] | list[NewLabel], now: datetime,
                       cfg: LoopSettings) -> str | None:
    """Labels production never learned, still too thin to learn (and not waited on for
    longer than ``loop.new_label_wait_s``): a retrain now would teach them from a handful
    of examples, and the next drift alarm comes soon enough. None when none is."""
    need, patience = cfg.min_examples_per_new_label, cfg.new_label_wait_s
    if not need:
        return None
    thin = [n for n in new_labels
            if n.examples < need and (now - n.first_seen).total_seconds() < patience]
    if not thin:
        return None
    shown = ", ".join(f"{n.label} ({n.examples}/{need})" for n in thin[:SHOWN_LABELS])
    more = f" and {len(thin) - SHOWN_LABELS} more" if len(thin) > SHOWN_LABELS else ""
    return f"waiting for labelled examples of new labels: {shown}{more}"


CHECKS: tuple[Check, ...] = (_canary_live, _candidate_unjudged, _candidate_held,
                             _retrain_running, _alarm_outdated, _cooling_down, _labels_thin)
