"""What the demo measured, and its goals met or missed, pure.

:class:`Result` is written to ``reports/demo.json`` as is (``dataclasses.asdict``): the
end-to-end test and the report read its keys. :func:`goals` is the one definition of
the goals that both the terminal summary and the HTML report show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tuneloop.services.demo.banking77 import Query
from tuneloop.services.evaluation.metrics import evaluate_predictions

OLD, NEW = "old intents", "new intents"
NEW_F1_GOAL, NEW_F1_STRETCH, OLD_DROP_POINTS, SHIFT_GOAL_S = 0.70, 0.85, 2.0, 1200.0
# json and text: the new groups' headline after must beat before with p below this
# (paired bootstrap over the held-out queries); a json alias's answers to them must
# satisfy the schema this often.
NEW_GAIN_ALPHA, SCHEMA_VALID_GOAL = 0.05, 0.95

Scores = dict[str, dict[str, float]]  # group ("old intents") -> metric -> value


@dataclass(frozen=True)
class OldDelta:
    """The old intents' macro-F1 change on the same held-out queries, in points, with its
    95% paired-bootstrap interval and the p-value that it fell by more than the margin
    (small: a real regression)."""

    points: float
    ci95: list[float]
    margin_points: float
    p_fell_beyond_margin: float
    queries: int
    p_not_better: float | None = None  # that it did not rise at all (small: a real gain)


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
    before: Scores = field(default_factory=dict)
    after: Scores = field(default_factory=dict)
    old_intents_delta: OldDelta | None = None
    # The task's kind and the before/after metric its goals read (label: macro-F1).
    kind: str = "label"
    headline: str = "macro_f1"
    new_intents_delta: OldDelta | None = None  # json and text: the new groups' gain
    # --dpo: pair counts and the held-out pairs' ranking accuracy after SFT and after DPO.
    dpo: dict[str, float] | None = None
    served_failures: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    report: str | None = None
    missed: list[str] = field(default_factory=list)

    def f1(self, when: str, group: str) -> float:
        """The headline (macro-F1 for intents) of ``group`` ``before`` or ``after`` the
        shift (0 when not measured)."""
        return self.metric(when, group, self.headline)

    def metric(self, when: str, group: str, name: str) -> float:
        """``name`` of ``group`` ``before`` or ``after`` the shift (0 when not measured)."""
        scores: Scores = self.before if when == "before" else self.after
        return scores.get(group, {}).get(name, 0.0)

    @property
    def old_change_points(self) -> float:
        """The old groups' change in points, after minus before: macro-F1 for intents;
        for ``json`` and ``text`` the mean per-example score's change, the figure its
        interval is about (the aggregate headline when that was not measured)."""
        if self.kind != "label" and self.old_intents_delta is not None:
            return self.old_intents_delta.points
        return 100 * (self.f1("after", OLD) - self.f1("before", OLD))


def scores(answers: Sequence[str], queries: Sequence[Query]) -> dict[str, float]:
    """Accuracy and macro-F1 of ``answers`` to ``queries``. Raises ``ValueError`` when
    their lengths differ or there are none."""
    intents = [q.intent for q in queries]
    report = evaluate_predictions(answers, intents, intents)
    return {"accuracy": report.accuracy or 0.0, "macro_f1": report.macro_f1 or 0.0}


def old_delta(queries: Sequence[Query], before: Sequence[str], after: Sequence[str]) -> OldDelta:
    """The old intents' change from ``before`` to ``after`` answers: a few hundred queries
    move by a few points between two adapters that are equally good, so the change is
    read with its interval. Raises ``ValueError`` when the lengths differ or are 0."""
    # Imported here: the statistics pull in scipy, which the CLI should not load to start.
    from tuneloop.services.canary.core import macro_f1_bootstrap

    boot = macro_f1_bootstrap([q.intent for q in queries], before, after,
                              OLD_DROP_POINTS / 100, alpha=0.05)
    return OldDelta(points=round(100 * boot.delta, 2),
                    ci95=[round(100 * boot.low, 2), round(100 * boot.high, 2)],
                    margin_points=OLD_DROP_POINTS, p_fell_beyond_margin=boot.p_beyond_margin,
                    queries=len(queries))


def mean_delta(before: Sequence[float], after: Sequence[float]) -> OldDelta:
    """The change of a mean per-query score (json field exact match, text chrF) from
    ``before`` to ``after`` on the same queries, in points, with its 95% paired-bootstrap
    interval, the p-value that it fell by more than the margin and the p-value that it did
    not rise. Raises ``ValueError`` when the lengths differ or are 0."""
    import numpy as np

    from tuneloop.services.canary.stats import paired_bootstrap

    if len(before) != len(after):
        raise ValueError(f"{len(before)} scores before and {len(after)} after: pair them")
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    boot = paired_bootstrap(lambda idx: float(b[idx].mean()), lambda idx: float(a[idx].mean()),
                            len(b), OLD_DROP_POINTS / 100, alpha=0.05)
    return OldDelta(points=round(100 * boot.delta, 2),
                    ci95=[round(100 * boot.low, 2), round(100 * boot.high, 2)],
                    margin_points=OLD_DROP_POINTS, p_fell_beyond_margin=boot.p_beyond_margin,
                    queries=len(b), p_not_better=boot.p_not_better)


@dataclass(frozen=True)
class Goal:
    """One goal as the report shows it; ``missed`` is its line in ``Result.missed``."""

    name: str
    measured: str
    target: str
    met: bool
    missed: str


def goals(r: Result) -> list[Goal]:
    """The demo's goals, measured on ``r``: four for intents; for json and text the new
    groups' gain in place of a fixed macro-F1, and for json the schema-valid rate."""
    if r.kind == "label":
        return [_new_intents(r), _old_intents(r), _shift(r), _steady(r)]
    valid = [_schema_valid(r)] if r.kind == "json" else []
    return [_new_gain(r), *valid, _old_intents(r), _shift(r), _steady(r)]


def missed_goals(r: Result) -> list[str]:
    """The lines of the goals ``r`` missed. No promotion at all is said where the wait
    ends (with how long it waited), so it adds no line here."""
    return [g.missed for g in goals(r) if not g.met and g.missed]


def _new_intents(r: Result) -> Goal:
    f1 = r.f1("after", NEW)
    return Goal("new-intent macro-F1 after", f"{f1:.3f}",
                f">= {NEW_F1_GOAL:.2f} (stretch {NEW_F1_STRETCH:.2f})", f1 >= NEW_F1_GOAL,
                f"new-intent macro-F1 {f1:.3f} < {NEW_F1_GOAL}")


def _new_gain(r: Result) -> Goal:
    before, after, d = r.f1("before", NEW), r.f1("after", NEW), r.new_intents_delta
    p = d.p_not_better if d and d.p_not_better is not None else 1.0
    met = after > before and p < NEW_GAIN_ALPHA
    return Goal(f"new-group {r.headline} before -> after", f"{before:.3f} -> {after:.3f} "
                f"(p {p:.3f}, paired bootstrap)", f"higher, p < {NEW_GAIN_ALPHA}", met,
                f"new-group {r.headline} {before:.3f} -> {after:.3f}, p {p:.3f} "
                f"(not a significant gain)")


def _schema_valid(r: Result) -> Goal:
    valid = r.metric("after", NEW, "schema_valid")
    return Goal("new-group answers valid under the schema, after", f"{valid:.3f}",
                f">= {SCHEMA_VALID_GOAL:.2f}", valid >= SCHEMA_VALID_GOAL,
                f"schema-valid rate {valid:.3f} < {SCHEMA_VALID_GOAL}")


def _old_intents(r: Result) -> Goal:
    delta, d = r.old_change_points, r.old_intents_delta
    ci = d.ci95 if d else [float("nan")] * 2
    measured = f"{delta:+.1f}" + (f" (95% interval {ci[0]:+.1f} to {ci[1]:+.1f}, "
                                  f"{d.queries} queries)" if d else "")
    what = "old-intent macro-F1" if r.kind == "label" else f"old-group {r.headline}"
    return Goal(f"{what} change (points)", measured, f">= {-OLD_DROP_POINTS:.1f}",
                delta >= -OLD_DROP_POINTS,
                f"{what} fell {-delta:.1f} points (> {OLD_DROP_POINTS}; "
                f"95% interval {ci[0]:+.1f} to {ci[1]:+.1f})")


def _shift(r: Result) -> Goal:
    s = r.shift_to_promotion_s
    return Goal("shift onset to promotion (s)", "-" if s is None else f"{s:.0f}",
                f"<= {SHIFT_GOAL_S:.0f}", s is not None and s <= SHIFT_GOAL_S,
                "" if s is None else f"shift to promotion {s:.0f} s (> {SHIFT_GOAL_S:.0f} s)")


def _steady(r: Result) -> Goal:
    alarms, retrains = r.steady_drift_alarms, r.steady_retrains
    return Goal("steady traffic: drift alarms / retrains", f"{alarms} / {retrains}", "0 / 0",
                not (alarms or retrains),
                f"steady traffic raised {alarms} drift alarm(s) and {retrains} retrain(s)")


def named_intents(clusters: Sequence[dict[str, Any]], new: Sequence[str]) -> list[str]:
    """The new intents a drift report's clusters name: a label of a cluster that is new
    or grew, or a label the reference never had ("new labels")."""
    wanted = set(new)
    grown = {lab["label"] for c in clusters if c["status"] in ("new", "grew")
             for lab in c.get("labels", [])}
    unseen = {label for c in clusters for label in c.get("new_labels", [])}
    return sorted((grown | unseen) & wanted)
