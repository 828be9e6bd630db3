"""The retrain guard as a pure decision: each reason to wait, its limits, and their order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tuneloop.runtime.settings import LoopSettings
from tuneloop.services.loop.policy import (
    DriftCheck,
    HeldCandidate,
    LoopSnapshot,
    NewLabel,
    Published,
    waiting_for_labels,
    why_not_retrain,
)

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
CFG = LoopSettings(cooldown_s=1800, min_examples_per_new_label=20, new_label_wait_s=3600)


def ago(**delta: float) -> datetime:
    return NOW - timedelta(**delta)


def test_nothing_in_the_way_lets_a_retrain_start() -> None:
    assert why_not_retrain(LoopSnapshot(), NOW, CFG) is None


def test_a_live_canary_holds_a_retrain() -> None:
    reason = why_not_retrain(LoopSnapshot(canary="v9"), NOW, CFG)
    assert reason == "canary v9 is still in its live window"


def test_a_new_candidate_waits_for_the_canarys_first_verdict() -> None:
    fresh = LoopSnapshot(unjudged=Published("v8", ago(minutes=30)))
    assert why_not_retrain(fresh, NOW, CFG) == "candidate v8 is waiting for the canary's verdict"
    # Older than two hours: a candidate the canary never got to does not hold the loop.
    stale = LoopSnapshot(unjudged=Published("v8", ago(hours=2, seconds=1)))
    assert why_not_retrain(stale, NOW, CFG) is None
    # Without the canary taking new candidates, nothing will judge it: no reason to wait.
    no_canary = CFG.model_copy(update={"canary_new_candidates": False})
    assert why_not_retrain(fresh, NOW, no_canary) is None


def test_a_held_candidate_waits_for_its_next_offline_look() -> None:
    later = NOW + timedelta(minutes=5)
    held = LoopSnapshot(held=(HeldCandidate("v7", ago(minutes=1)), HeldCandidate("v8", later)))
    assert why_not_retrain(held, NOW, CFG) == (
        "candidate v8 is waiting for more labelled events before its next offline look at "
        f"{later:%H:%M:%S}")
    # A look that is due already no longer holds a retrain back.
    assert why_not_retrain(LoopSnapshot(held=(HeldCandidate("v7", NOW),)), NOW, CFG) is None


def test_a_running_retrain_holds_another() -> None:
    started = ago(minutes=10)
    reason = why_not_retrain(LoopSnapshot(running_since=started), NOW, CFG)
    assert reason == f"a retrain started at {started:%H:%M:%S} is still running"
    # A start two hours old with no end is a run that died without a record.
    assert why_not_retrain(LoopSnapshot(running_since=ago(hours=3)), NOW, CFG) is None


def test_the_cooldown_follows_the_last_retrain() -> None:
    reason = why_not_retrain(LoopSnapshot(last_trained_at=ago(seconds=600)), NOW, CFG)
    assert reason == "cool-down: the last retrain finished 600 s ago (loop.cooldown_s=1800)"
    assert why_not_retrain(LoopSnapshot(last_trained_at=ago(seconds=1800)), NOW, CFG) is None
    none = CFG.model_copy(update={"cooldown_s": 0})
    assert why_not_retrain(LoopSnapshot(last_trained_at=NOW), NOW, none) is None


def test_a_thin_new_label_holds_a_retrain_until_it_has_examples_or_patience_runs_out() -> None:
    thin = (NewLabel("unheard", 3, ago(minutes=10)), NewLabel("plenty", 25, ago(minutes=10)))
    reason = why_not_retrain(LoopSnapshot(new_labels=thin), NOW, CFG) or ""
    assert reason == "waiting for labelled examples of new labels: unheard (3/20)"
    old = (NewLabel("unheard", 3, ago(seconds=3600)),)
    assert why_not_retrain(LoopSnapshot(new_labels=old), NOW, CFG) is None
    never = CFG.model_copy(update={"min_examples_per_new_label": 0})
    assert why_not_retrain(LoopSnapshot(new_labels=thin), NOW, never) is None


def test_many_thin_labels_are_summed_up() -> None:
    labels = [NewLabel(f"l{i}", i, ago(minutes=1)) for i in range(6)]
    reason = waiting_for_labels(labels, NOW, CFG) or ""
    assert reason.endswith("l0 (0/20), l1 (1/20), l2 (2/20), l3 (3/20) and 2 more")


def test_a_resumed_run_key_goes_on_whatever_else_holds() -> None:
    everything = LoopSnapshot(
        resumed=True, canary="v9", unjudged=Published("v8", NOW),
        held=(HeldCandidate("v7", NOW + timedelta(hours=1)),), running_since=NOW,
        last_trained_at=NOW, new_labels=(NewLabel("unheard", 1, NOW),))
    assert why_not_retrain(everything, NOW, CFG) is None


def test_the_first_reason_in_order_is_given() -> None:
    snapshot = LoopSnapshot(
        canary="v9", unjudged=Published("v8", NOW), running_since=NOW, last_trained_at=NOW,
        new_labels=(NewLabel("unheard", 1, NOW),))
    reasons = []
    while (reason := why_not_retrain(snapshot, NOW, CFG)) is not None:
        reasons.append(reason.split()[0])
        snapshot = _without_first(snapshot)
    assert reasons == ["canary", "candidate", "a", "cool-down:", "waiting"]


def _without_first(snapshot: LoopSnapshot) -> LoopSnapshot:
    from dataclasses import fields, replace

    for field in fields(LoopSnapshot):
        value = getattr(snapshot, field.name)
        if field.name != "resumed" and value not in (None, ()):
            return replace(snapshot, **{field.name: field.default})
    return snapshot


def test_a_drift_alarm_from_before_a_promotion_does_not_retrain() -> None:
    """An alarm measured against the previous production's reference waits for a check
    against the new one; a retrain started by labels or by hand is not held by it."""
    promoted = Published("v2", ago(seconds=55))
    before = DriftCheck(ago(minutes=2), drifted=True)
    stale = LoopSnapshot(drift_triggered=True, production=promoted, last_check=before)
    assert "production changed to v2" in (why_not_retrain(stale, NOW, CFG) or "")
    quiet = LoopSnapshot(drift_triggered=True, production=promoted,
                         last_check=DriftCheck(ago(seconds=5), drifted=False))
    assert "found no drift" in (why_not_retrain(quiet, NOW, CFG) or "")
    still = LoopSnapshot(drift_triggered=True, production=promoted,
                         last_check=DriftCheck(ago(seconds=5), drifted=True))
    assert why_not_retrain(still, NOW, CFG) is None
    assert why_not_retrain(LoopSnapshot(production=promoted, last_check=before), NOW, CFG) is None
    base_model = LoopSnapshot(drift_triggered=True, last_check=before)
    assert why_not_retrain(base_model, NOW, CFG) is None
