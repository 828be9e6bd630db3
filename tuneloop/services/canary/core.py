"""The canary's decisions: pure functions from paired answers and live windows to a verdict.

This module holds what both gates share (:class:`Check`, :class:`Decision`, :class:`Plan`)
and the offline gate; the live gate is :mod:`tuneloop.services.canary.live`.

Two gates stand between a candidate adapter and production traffic:

1. **Offline.** The candidate and the incumbent (the production version, or the base
   model) answer the same golden set, the candidate's test split and the labelled
   events written after its dataset. Promotion needs no regression on the golden set
   beyond ``golden_margin`` (the task's score, paired bootstrap: macro-F1 for labels,
   with each label by exact McNemar with Holm's correction, on the golden set and again
   on its golden, test and newer labelled examples pooled (two tests of a label: a good
   candidate is rejected somewhat more often than ``alpha``); the mean field F1 for
   ``json``, whose schema-valid rate must not fall either; the mean chrF for ``text``)
   and a significant improvement on the test examples (exact McNemar on right answers for
   labels; a paired bootstrap of the mean field F1 for json, whole objects reported by
   McNemar, and of chrF for text). A significant regression
   rejects; anything inconclusive holds, and an
   inconclusive improvement is looked at again on the labelled events that arrive
   meanwhile (at most ``offline_looks`` looks, each at ``alpha / offline_looks``).
   Noise therefore neither promotes nor blocks for good.
2. **Live.** The candidate answers a sticky share of users for a window; its error
   rate and bad-rating rate (two-proportion z-tests) and its latency (Mann-Whitney U
   and the p95 ratio) are compared with production's over the same window. Three
   outcomes, as in Argo Rollouts and Kayenta: promote, roll back, or hold and extend
   the window, up to a maximum, then roll back.

Each :class:`Check` carries its statistic, p-value and threshold, so every decision
can say exactly why it went the way it did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from tuneloop.runtime.settings import CanarySettings
from tuneloop.services.canary.stats import Bootstrap, holm, mcnemar, paired_bootstrap
from tuneloop.services.evaluation.metrics import (
    encode_labels,
    macro_f1,
    normalize_label,
    normalize_text,
)
from tuneloop.services.evaluation.tasks import (
    SCORE_NAMES,
    evaluate,
    parse_object,
    reference_object,
    score_object,
)

PASS, FAIL, HOLD, INFO = "pass", "fail", "hold", "info"


@dataclass(frozen=True)
class Check:
    """One test of a decision."""

    name: str
    outcome: str  # pass | fail | hold | info
    statistic: float | None
    p_value: float | None
    threshold: str
    detail: str

    def line(self) -> str:
        if self.statistic is None and self.p_value is None and not self.threshold:
            return f"{self.name}: {self.detail}"
        stat = "-" if self.statistic is None else f"{self.statistic:.4g}"
        p = "-" if self.p_value is None else f"{self.p_value:.3g}"
        return f"{self.name}: {self.outcome} (statistic {stat}, p {p}; {self.threshold}) {self.detail}"


@dataclass
class Decision:
    """What a gate decided about ``candidate`` against ``incumbent`` (None: the base model)."""

    stage: str  # offline | live | freeze | manual | retrain
    candidate: str | None
    incumbent: str | None
    verdict: str  # pass | reject | hold | promote | rollback | frozen | trained | skipped
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        failed = [c for c in self.checks if c.outcome == FAIL]
        held = [c for c in self.checks if c.outcome == HOLD]
        why = failed or held or [c for c in self.checks if c.outcome == PASS] or [
            c for c in self.checks if c.outcome == INFO]
        text = "; ".join(c.line() for c in why[:4]) or "no checks"
        if self.stage == "retrain":
            return f"retrain {self.verdict}" + (f" ({self.candidate})" if self.candidate
                                                else "") + f": {text}"
        who = f"{self.candidate or 'base'} vs {self.incumbent or 'base'}"
        return f"{self.stage} gate: {self.verdict} ({who}): {text}"

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "candidate": self.candidate, "incumbent": self.incumbent,
                "verdict": self.verdict, "checks": [asdict(c) for c in self.checks],
                "figures": self.figures}


def combine(checks: Sequence[Check], passed: str = "pass", failed: str = "reject") -> str:
    """Any failed check decides ``failed``; else any held check holds; else ``passed``."""
    if any(c.outcome == FAIL for c in checks):
        return failed
    if any(c.outcome == HOLD for c in checks):
        return "hold"
    return passed


@dataclass(frozen=True)
class Plan:
    """Where a candidate stands when the canary flow starts, or starts again after a crash."""

    candidate: str
    state: str  # its registry state
    incumbent: str | None  # the alias's production version; None: the base model
    freeze: str | None  # the active deployment freeze's reason, if any
    live_started_at: float | None  # when its live window opened, if it did

    @property
    def step(self) -> str:
        """What the flow does next.

        ``done``: already decided (a repeated trigger, or a rerun after the verdict);
        ``frozen``: a candidate waits, untouched, while promotions are frozen;
        ``offline``: the offline gate; ``live``: the live window (resumed when a rerun
        finds the candidate already the canary; a freeze holds its promotion instead).
        """
        if self.state not in ("candidate", "canary"):
            return "done"
        if self.state == "canary":
            return "live"
        return "frozen" if self.freeze is not None else "offline"

    def frozen(self) -> Decision:
        """The decision recorded for a candidate that waits out a freeze."""
        return Decision("offline", self.candidate, self.incumbent, "frozen",
                        figures={"freeze": self.freeze})


# ------------------------------------------------------------------ offline gate
@dataclass(frozen=True)
class Paired:
    """Both versions' answers to the same examples, with the reference for each, and the
    task they are judged by (its ``kind``, and for ``json`` the schema)."""

    references: list[str]
    labels: list[str | None]
    incumbent: list[str]
    candidate: list[str]
    kind: str = "label"
    schema: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        sizes = {len(self.references), len(self.labels), len(self.incumbent), len(self.candidate)}
        if len(sizes) != 1:
            raise ValueError(f"paired answers differ in length: {sorted(sizes)}")

    @property
    def labelled(self) -> bool:
        return self.kind == "label" and bool(self.labels) and all(
            label is not None for label in self.labels)

    @property
    def metric(self) -> str:
        """The name of the score the examples are judged by."""
        if self.kind == "label":
            return "macro-F1" if self.labelled else "exact match"
        return SCORE_NAMES[self.kind]

    def right(self, answers: Sequence[str]) -> list[bool]:
        """Whether each answer is correct: the label it names, the whole object (``json``),
        else the exact text."""
        if self.labelled:
            return [normalize_label(a) == normalize_label(str(g))
                    for a, g in zip(answers, self.labels, strict=True)]
        if self.kind == "json":
            return [score_object(a, reference_object(r), self.schema).exact
                    for a, r in zip(answers, self.references, strict=True)]
        return [normalize_text(a) == normalize_text(r)
                for a, r in zip(answers, self.references, strict=True)]

    def valid(self, answers: Sequence[str]) -> list[bool]:
        """``json``: whether each answer is an object its schema accepts."""
        return [score_object(a, reference_object(r), self.schema).valid
                for a, r in zip(answers, self.references, strict=True)]

    def scores(self, answers: Sequence[str]) -> np.ndarray:
        """Each answer's score on the task (:func:`~tuneloop.services.evaluation.tasks.evaluate`)."""
        report = evaluate(self.kind, answers, self.references,
                          self.labels if self.labelled else None, schema=self.schema)
        return np.asarray(report.per_example, dtype=float)


def golden_checks(golden: Paired, cfg: CanarySettings) -> tuple[list[Check], dict[str, Any]]:
    """No regression beyond the margin on the golden set: the task's score (macro-F1 and
    each label's F1 for labels; the mean per-example score otherwise) and, for ``json``,
    the schema-valid rate."""
    if not golden.references:
        return [Check("golden set", HOLD, None, None, "at least 1 example",
                      "the golden set is empty: add one with `tuneloop golden add`")], {}
    if golden.kind == "json":
        bad = sum(parse_object(r) is None for r in golden.references)
        if bad:
            return [Check("golden set", HOLD, float(bad), None, "every reference a JSON object",
                          f"{bad} of {len(golden.references)} golden references are not JSON "
                          "objects (a golden set from before the task was json?): drop them "
                          "with `tuneloop golden remove --invalid` and add others with "
                          "`tuneloop golden add`")], {}
    inc_right, cand_right = golden.right(golden.incumbent), golden.right(golden.candidate)
    figures: dict[str, Any] = {
        "golden_n": len(golden.references),
        "golden_accuracy": {"incumbent": _mean(inc_right), "candidate": _mean(cand_right)},
    }
    label_checks: list[Check] = []
    metric = golden.metric
    if golden.labelled:
        boot, figures["golden_macro_f1"] = _macro_f1_delta(golden, cfg)
        figures["golden_per_label"], label_checks = _label_checks(golden, inc_right,
                                                                  cand_right, cfg)
        figures["golden_score"] = {"metric": metric, **figures["golden_macro_f1"]}
    else:
        score_i, score_c = golden.scores(golden.incumbent), golden.scores(golden.candidate)
        boot = paired_bootstrap(lambda idx: float(score_i[idx].mean()),
                                lambda idx: float(score_c[idx].mean()),
                                len(score_i), cfg.golden_margin, cfg.alpha,
                                cfg.bootstrap_resamples, cfg.seed)
        figures["golden_score"] = {"metric": metric, "incumbent": float(score_i.mean()),
                                   "candidate": float(score_c.mean()),
                                   "delta_ci": [boot.low, boot.high]}
    if golden.kind == "json":
        label_checks.append(_valid_check("golden", golden, cfg, figures))
    paired = mcnemar(inc_right, cand_right)
    what = "whole-object exact match" if golden.kind == "json" else "accuracy"
    accuracy = Check(f"golden {what} (McNemar)", INFO,
                     float(paired.only_candidate - paired.only_incumbent), paired.p_worse,
                     "reported, not gating",
                     f"candidate alone right {paired.only_candidate}, incumbent alone right "
                     f"{paired.only_incumbent}")
    return [_margin_check(metric, boot, cfg), accuracy, *label_checks], figures


def _valid_check(where: str, paired_answers: Paired, cfg: CanarySettings,
                 figures: dict[str, Any]) -> Check:
    """``json``: fail when the candidate's answers break the schema significantly more
    often than the incumbent's (exact McNemar)."""
    inc_ok = paired_answers.valid(paired_answers.incumbent)
    cand_ok = paired_answers.valid(paired_answers.candidate)
    figures[f"{where}_schema_valid"] = {"incumbent": _mean(inc_ok), "candidate": _mean(cand_ok)}
    test = mcnemar(inc_ok, cand_ok)
    worse = test.p_worse < cfg.alpha
    return Check(f"{where} schema-valid (McNemar)", FAIL if worse else PASS,
                 float(test.only_candidate - test.only_incumbent), test.p_worse,
                 f"fail if less often valid with p < {cfg.alpha}",
                 f"valid {_mean(inc_ok):.3f} -> {_mean(cand_ok):.3f}; only the candidate valid "
                 f"{test.only_candidate}, only the incumbent {test.only_incumbent}")


def _macro_f1_delta(golden: Paired, cfg: CanarySettings) -> tuple[Bootstrap, dict[str, Any]]:
    """The bootstrap of the macro-F1 difference, and both versions' macro-F1."""
    gold, (inc, cand), names = _encode(golden.labels, golden.incumbent, golden.candidate)
    boot = macro_f1_bootstrap([str(g) for g in golden.labels], golden.incumbent,
                              golden.candidate, cfg.golden_margin, cfg.alpha,
                              cfg.bootstrap_resamples, cfg.seed)
    return boot, {"incumbent": macro_f1(gold, inc, len(names)),
                  "candidate": macro_f1(gold, cand, len(names)),
                  "delta_ci": [boot.low, boot.high]}


def _margin_check(metric: str, boot: Bootstrap, cfg: CanarySettings) -> Check:
    """Fail on a significant drop beyond the margin; hold on a drop beyond it that noise
    explains; else pass."""
    threshold = f"fail if p < {cfg.alpha} that it is worse by more than {cfg.golden_margin}"
    detail = f"{metric} delta {boot.delta:+.3f} [{boot.low:+.3f}, {boot.high:+.3f}]"
    if boot.p_beyond_margin < cfg.alpha:
        outcome = FAIL
    elif boot.delta < -cfg.golden_margin:
        outcome, detail = HOLD, detail + ": below the margin, not significantly"
    else:
        outcome = PASS
    return Check(f"golden {metric} (paired bootstrap)", outcome, boot.delta,
                 boot.p_beyond_margin, threshold, detail)


def improvement_checks(test: Paired, cfg: CanarySettings, fresh_n: int = 0,
                       look: int = 1) -> tuple[list[Check], dict[str, Any]]:
    """A significant improvement on the candidate's test split and the labelled events that
    arrived after its dataset: exact McNemar (one-sided) on right answers for labels, a
    paired bootstrap of the mean per-example score for ``json`` (field F1; whole-object
    exact match by McNemar is reported, and the schema-valid rate must not fall) and
    ``text`` (chrF).

    ``look`` of ``cfg.offline_looks``: each look tests the improvement at
    ``alpha / offline_looks`` (Bonferroni over the looks), so a candidate looked at again
    on more data is no likelier to pass by chance. A significant regression fails at
    ``alpha`` on any look.
    """
    if not test.references:
        return [Check("test split improvement", HOLD, None, None, "at least 1 example",
                      "the candidate's dataset has no test split and no labelled event came "
                      "after it; nothing shows an improvement")], {}
    test, fresh_n, left_out = _judgeable(test, fresh_n)
    if not test.references:
        return [Check("test split improvement", HOLD, float(left_out), None,
                      "every reference a JSON object",
                      f"none of the {left_out} test-split and newer references is a JSON "
                      "object (a dataset curated before the task was json?): nothing shows "
                      "an improvement")], {"test_left_out": left_out}
    alpha = cfg.alpha / cfg.offline_looks
    inc_right, cand_right = test.right(test.incumbent), test.right(test.candidate)
    score_i, score_c = test.scores(test.incumbent), test.scores(test.candidate)
    n_test = len(test.references) - fresh_n
    figures: dict[str, Any] = {
        "test_n": n_test, "fresh_n": fresh_n, "test_left_out": left_out, "look": look,
        "looks": cfg.offline_looks,
        "test_accuracy": {"incumbent": _mean(inc_right), "candidate": _mean(cand_right)},
        "test_score": {"metric": "accuracy" if test.kind == "label" else test.metric,
                       "incumbent": float(score_i.mean()), "candidate": float(score_c.mean())}}
    threshold = f"pass if p < {alpha:.3g} (alpha / {cfg.offline_looks} looks)"
    where = (f"{n_test} test-split + {fresh_n} newer labelled examples"
             + (f" ({left_out} left out: references not JSON objects)" if left_out else "")
             + f", look {look}/{cfg.offline_looks}")
    if test.kind in ("text", "json"):
        boot = paired_bootstrap(lambda idx: float(score_i[idx].mean()),
                                lambda idx: float(score_c[idx].mean()), len(score_i), 0.0,
                                cfg.alpha, cfg.bootstrap_resamples, cfg.seed)
        name = f"test split improvement ({test.metric}, paired bootstrap)"
        detail = (f"{where}: {test.metric} {score_i.mean():.3f} -> {score_c.mean():.3f}, delta "
                  f"[{boot.low:+.3f}, {boot.high:+.3f}]")
        better, worse, net = boot.p_not_better, boot.p_beyond_margin, boot.delta
    else:
        paired = mcnemar(inc_right, cand_right)
        what = "whole-object exact match" if test.kind == "json" else "accuracy"
        name = "test split improvement (McNemar)"
        detail = (f"{where}: {what} {_mean(inc_right):.3f} -> {_mean(cand_right):.3f}; "
                  f"candidate alone right {paired.only_candidate}, incumbent alone right "
                  f"{paired.only_incumbent}")
        better, worse = paired.p_better, paired.p_worse
        net = float(paired.only_candidate - paired.only_incumbent)
    if better < alpha:
        check = Check(name, PASS, net, better, threshold, detail)
    elif worse < cfg.alpha:
        check = Check(name, FAIL, net, worse, f"fail if worse with p < {cfg.alpha}",
                      detail + ": significantly worse")
    else:
        check = Check(name, HOLD, net, better, threshold, detail + ": inconclusive")
    checks = [check]
    if test.kind == "json":
        # Whole objects are reported beside the field F1 that decides: a candidate that gets
        # more fields right without yet getting whole objects right is still better.
        exact = mcnemar(inc_right, cand_right)
        checks.append(Check(
            "test split whole-object exact match (McNemar)", INFO,
            float(exact.only_candidate - exact.only_incumbent), exact.p_better,
            "reported, not gating",
            f"whole-object exact match {_mean(inc_right):.3f} -> {_mean(cand_right):.3f}; "
            f"candidate alone right {exact.only_candidate}, incumbent alone right "
            f"{exact.only_incumbent}"))
        checks.append(_valid_check("test split", test, cfg, figures))
    return checks, figures


def _judgeable(test: Paired, fresh_n: int) -> tuple[Paired, int, int]:
    """``json``: the examples whose reference is a JSON object (the only kind a json task can
    judge), how many of them are newer (the last ``fresh_n``), and how many were left out."""
    if test.kind != "json":
        return test, fresh_n, 0
    n_test = len(test.references) - fresh_n
    keep = [i for i, r in enumerate(test.references) if parse_object(r) is not None]
    if len(keep) == len(test.references):
        return test, fresh_n, 0
    kept = replace(test, references=[test.references[i] for i in keep],
                   labels=[test.labels[i] for i in keep],
                   incumbent=[test.incumbent[i] for i in keep],
                   candidate=[test.candidate[i] for i in keep])
    return kept, sum(i >= n_test for i in keep), len(test.references) - len(keep)


def only_improvement_holds(decision: Decision) -> bool:
    """True when the improvement test alone held the verdict: more labelled data can
    settle it (the golden set's answers do not change between looks)."""
    held = [c for c in decision.checks if c.outcome == HOLD]
    return decision.verdict == "hold" and bool(held) and all(
        c.name.startswith("test split improvement") for c in held)


def another_look(decision: Decision, cfg: CanarySettings) -> int | None:
    """The number of the next offline look at the same candidate, or None when the
    verdict stands: only an improvement held by too little data is looked at again,
    at most ``cfg.offline_looks`` times."""
    if not only_improvement_holds(decision):
        return None
    seen = int(decision.figures.get("look", cfg.offline_looks))
    return seen + 1 if seen < cfg.offline_looks else None


def known_label_checks(golden: Paired, test: Paired, cfg: CanarySettings
                       ) -> tuple[list[Check], dict[str, Any]]:
    """Each label production is held to (those of the golden set) judged again on every
    example of it the gate has: the golden set, the test split and the newer labelled
    events. A handful of golden examples a label cannot show a collapse of that label
    significantly; pooled with the test examples it can. A label whose F1 drops more
    than ``label_margin`` fails when the candidate is worse on it by exact McNemar,
    Holm-corrected over the labels. Labels only: other kinds have no per-label score."""
    if not golden.labelled or test.kind != "label":
        return [], {}
    known = {normalize_label(str(label)) for label in golden.labels}
    keep = [i for i, label in enumerate(test.labels)
            if label is not None and normalize_label(label) in known]
    if not keep:
        return [], {}
    pooled = Paired(
        references=golden.references + [test.references[i] for i in keep],
        labels=golden.labels + [test.labels[i] for i in keep],
        incumbent=golden.incumbent + [test.incumbent[i] for i in keep],
        candidate=golden.candidate + [test.candidate[i] for i in keep],
        kind=golden.kind)
    per_label, checks = _label_checks(pooled, pooled.right(pooled.incumbent),
                                      pooled.right(pooled.candidate), cfg,
                                      "known label {} (golden + test + newer, McNemar, Holm)")
    return checks, {"known_label_n": len(pooled.labels), "known_per_label": per_label}


def _label_checks(golden: Paired, inc_right: list[bool], cand_right: list[bool],
                  cfg: CanarySettings, name_format: str = "golden label {} (McNemar, Holm)",
                  ) -> tuple[dict[str, Any], list[Check]]:
    from tuneloop.services.evaluation.metrics import classification_breakdown

    labels = [normalize_label(str(g)) for g in golden.labels]
    names = sorted(set(labels))
    f1_inc = classification_breakdown([normalize_label(a) for a in golden.incumbent], labels)
    f1_cand = classification_breakdown([normalize_label(a) for a in golden.candidate], labels)
    p_worse = []
    for name in names:
        idx = [i for i, g in enumerate(labels) if g == name]
        p_worse.append(mcnemar([inc_right[i] for i in idx], [cand_right[i] for i in idx]).p_worse)
    per_label: dict[str, Any] = {}
    checks: list[Check] = []
    for name, p_adj in zip(names, holm(p_worse), strict=True):
        before, after = f1_inc[name].f1, f1_cand[name].f1
        per_label[name] = {"incumbent_f1": before, "candidate_f1": after, "p_worse_holm": p_adj}
        if before - after > cfg.label_margin:
            significant = p_adj < cfg.alpha
            checks.append(Check(
                name_format.format(name), FAIL if significant else INFO,
                after - before, p_adj,
                f"fail if F1 drops > {cfg.label_margin} with p < {cfg.alpha}",
                f"F1 {before:.2f} -> {after:.2f}" + ("" if significant else ": not significant")))
    return per_label, checks


def macro_f1_bootstrap(labels: Sequence[str], incumbent: Sequence[str],
                       candidate: Sequence[str], margin: float, alpha: float,
                       resamples: int = 2000, seed: int = 0) -> Bootstrap:
    """Macro-F1 of ``candidate`` minus ``incumbent`` on the same labelled examples, with
    the paired bootstrap's interval and the p-value that it is worse by more than
    ``margin``. Raises ``ValueError`` when the lengths differ or there are no examples."""
    if not len(labels) == len(incumbent) == len(candidate):
        raise ValueError(f"{len(labels)} labels, {len(incumbent)} incumbent and "
                         f"{len(candidate)} candidate answers: pair them")
    gold, (inc, cand), names = _encode(labels, incumbent, candidate)
    return paired_bootstrap(lambda idx: macro_f1(gold[idx], inc[idx], len(names)),
                            lambda idx: macro_f1(gold[idx], cand[idx], len(names)),
                            len(gold), margin, alpha, resamples, seed)


def _encode(labels: Sequence[str | None], *answers: Sequence[str]
            ) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """Labels and answers normalised, then as the integer codes :func:`macro_f1` takes."""
    return encode_labels([normalize_label(str(g)) for g in labels],
                         *([normalize_label(a) for a in given] for given in answers))


def _mean(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else 0.0
