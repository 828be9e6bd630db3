"""The canary's decisions: pure functions from paired answers and live windows to a verdict.

Two gates stand between a candidate adapter and production traffic:

1. **Offline.** The candidate and the incumbent (the production version, or the base
   model) answer the same golden set, the candidate's test split and the labelled
   events written after its dataset. Promotion needs no regression on the golden set
   beyond ``golden_margin`` (macro-F1, paired bootstrap; each label, exact McNemar with
   Holm's correction) and a significant improvement on the test examples (exact
   McNemar). A significant regression rejects; anything inconclusive holds, and an
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
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tuneloop.runtime.settings import CanarySettings
from tuneloop.services.canary.stats import (
    Bootstrap,
    holm,
    mann_whitney,
    mcnemar,
    paired_bootstrap,
    two_proportions,
)
from tuneloop.services.evaluation.metrics import normalize_label, normalize_text

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


# ------------------------------------------------------------------ offline gate
@dataclass(frozen=True)
class Paired:
    """Both versions' answers to the same examples, with the reference for each."""

    references: list[str]
    labels: list[str | None]
    incumbent: list[str]
    candidate: list[str]

    def __post_init__(self) -> None:
        sizes = {len(self.references), len(self.labels), len(self.incumbent), len(self.candidate)}
        if len(sizes) != 1:
            raise ValueError(f"paired answers differ in length: {sorted(sizes)}")

    @property
    def labelled(self) -> bool:
        return bool(self.labels) and all(label is not None for label in self.labels)

    def right(self, answers: Sequence[str]) -> list[bool]:
        """Whether each answer is correct: the label it names, else the exact text."""
        if self.labelled:
            return [normalize_label(a) == normalize_label(str(g))
                    for a, g in zip(answers, self.labels, strict=True)]
        return [normalize_text(a) == normalize_text(r)
                for a, r in zip(answers, self.references, strict=True)]


def golden_checks(golden: Paired, cfg: CanarySettings) -> tuple[list[Check], dict[str, Any]]:
    """No regression beyond the margin on the golden set, overall and per label."""
    if not golden.references:
        return [Check("golden set", HOLD, None, None, "at least 1 example",
                      "the golden set is empty: add one with `tuneloop golden add`")], {}
    inc_right, cand_right = golden.right(golden.incumbent), golden.right(golden.candidate)
    figures: dict[str, Any] = {
        "golden_n": len(golden.references),
        "golden_accuracy": {"incumbent": _mean(inc_right), "candidate": _mean(cand_right)},
    }
    checks: list[Check] = []
    if golden.labelled:
        gold, inc_pred, cand_pred, names = _encode(golden)
        boot = macro_f1_bootstrap([str(g) for g in golden.labels], golden.incumbent,
                                  golden.candidate, cfg.golden_margin, cfg.alpha,
                                  cfg.bootstrap_resamples, cfg.seed)
        metric = "macro-F1"
        figures["golden_macro_f1"] = {
            "incumbent": _macro_f1(gold, inc_pred, len(names)),
            "candidate": _macro_f1(gold, cand_pred, len(names)),
            "delta_ci": [boot.low, boot.high]}
        per_label, label_checks = _label_checks(golden, inc_right, cand_right, cfg)
        figures["golden_per_label"] = per_label
    else:
        right_i = np.array(inc_right, dtype=float)
        right_c = np.array(cand_right, dtype=float)
        boot = paired_bootstrap(lambda idx: float(right_i[idx].mean()),
                                lambda idx: float(right_c[idx].mean()),
                                len(right_i), cfg.golden_margin, cfg.alpha,
                                cfg.bootstrap_resamples, cfg.seed)
        metric = "exact match"
        label_checks = []
    threshold = f"fail if p < {cfg.alpha} that it is worse by more than {cfg.golden_margin}"
    detail = f"{metric} delta {boot.delta:+.3f} [{boot.low:+.3f}, {boot.high:+.3f}]"
    if boot.p_beyond_margin < cfg.alpha:
        outcome = FAIL
    elif boot.delta < -cfg.golden_margin:
        outcome, detail = HOLD, detail + ": below the margin, not significantly"
    else:
        outcome = PASS
    checks.append(Check(f"golden {metric} (paired bootstrap)", outcome, boot.delta,
                        boot.p_beyond_margin, threshold, detail))
    paired = mcnemar(inc_right, cand_right)
    checks.append(Check("golden accuracy (McNemar)", INFO,
                        float(paired.only_candidate - paired.only_incumbent), paired.p_worse,
                        "reported, not gating",
                        f"candidate alone right {paired.only_candidate}, incumbent alone right "
                        f"{paired.only_incumbent}"))
    return checks + label_checks, figures


def improvement_checks(test: Paired, cfg: CanarySettings, fresh_n: int = 0,
                       look: int = 1) -> tuple[list[Check], dict[str, Any]]:
    """A significant improvement on the candidate's test split and the labelled events that
    arrived after its dataset (exact McNemar, one-sided).

    ``look`` of ``cfg.offline_looks``: each look tests the improvement at
    ``alpha / offline_looks`` (Bonferroni over the looks), so a candidate looked at again
    on more data is no likelier to pass by chance. A significant regression fails at
    ``alpha`` on any look.
    """
    if not test.references:
        return [Check("test split improvement", HOLD, None, None, "at least 1 example",
                      "the candidate's dataset has no test split and no labelled event came "
                      "after it; nothing shows an improvement")], {}
    alpha = cfg.alpha / cfg.offline_looks
    inc_right, cand_right = test.right(test.incumbent), test.right(test.candidate)
    paired = mcnemar(inc_right, cand_right)
    n_test = len(test.references) - fresh_n
    figures = {"test_n": n_test, "fresh_n": fresh_n, "look": look, "looks": cfg.offline_looks,
               "test_accuracy": {"incumbent": _mean(inc_right), "candidate": _mean(cand_right)}}
    detail = (f"{n_test} test-split + {fresh_n} newer labelled examples, look {look}/"
              f"{cfg.offline_looks}: accuracy {_mean(inc_right):.3f} -> {_mean(cand_right):.3f}; "
              f"candidate alone right {paired.only_candidate}, incumbent alone right "
              f"{paired.only_incumbent}")
    name = "test split improvement (McNemar)"
    net = float(paired.only_candidate - paired.only_incumbent)
    threshold = f"pass if p < {alpha:.3g} (alpha / {cfg.offline_looks} looks)"
    if paired.p_better < alpha:
        check = Check(name, PASS, net, paired.p_better, threshold, detail)
    elif paired.p_worse < cfg.alpha:
        check = Check(name, FAIL, net, paired.p_worse, f"fail if worse with p < {cfg.alpha}",
                      detail + ": significantly worse")
    else:
        check = Check(name, HOLD, net, paired.p_better, threshold, detail + ": inconclusive")
    return [check], figures


def only_improvement_holds(decision: Decision) -> bool:
    """True when the improvement test alone held the verdict: more labelled data can
    settle it (the golden set's answers do not change between looks)."""
    held = [c for c in decision.checks if c.outcome == HOLD]
    return decision.verdict == "hold" and bool(held) and all(
        c.name.startswith("test split improvement") for c in held)


def _label_checks(golden: Paired, inc_right: list[bool], cand_right: list[bool],
                  cfg: CanarySettings) -> tuple[dict[str, Any], list[Check]]:
    labels = [normalize_label(str(g)) for g in golden.labels]
    names = sorted(set(labels))
    f1_inc = _per_label_f1(labels, [normalize_label(a) for a in golden.incumbent])
    f1_cand = _per_label_f1(labels, [normalize_label(a) for a in golden.candidate])
    p_worse = []
    for name in names:
        idx = [i for i, g in enumerate(labels) if g == name]
        p_worse.append(mcnemar([inc_right[i] for i in idx], [cand_right[i] for i in idx]).p_worse)
    adjusted = holm(p_worse)
    per_label: dict[str, Any] = {}
    checks: list[Check] = []
    for name, p_adj in zip(names, adjusted, strict=True):
        drop = f1_inc[name] - f1_cand[name]
        per_label[name] = {"incumbent_f1": f1_inc[name], "candidate_f1": f1_cand[name],
                           "p_worse_holm": p_adj}
        if drop > cfg.label_margin:
            significant = p_adj < cfg.alpha
            checks.append(Check(
                f"golden label {name} (McNemar, Holm)", FAIL if significant else INFO, -drop,
                p_adj, f"fail if F1 drops > {cfg.label_margin} with p < {cfg.alpha}",
                f"F1 {f1_inc[name]:.2f} -> {f1_cand[name]:.2f}"
                + ("" if significant else ": not significant")))
    return per_label, checks


def macro_f1_bootstrap(labels: Sequence[str], incumbent: Sequence[str],
                       candidate: Sequence[str], margin: float, alpha: float,
                       resamples: int = 2000, seed: int = 0) -> Bootstrap:
    """Macro-F1 of ``candidate`` minus ``incumbent`` on the same labelled examples, with
    the paired bootstrap's interval and the p-value that it is worse by more than
    ``margin``."""
    gold, inc_pred, cand_pred, names = _encode(
        Paired(list(labels), list(labels), list(incumbent), list(candidate)))
    return paired_bootstrap(lambda idx: _macro_f1(gold[idx], inc_pred[idx], len(names)),
                            lambda idx: _macro_f1(gold[idx], cand_pred[idx], len(names)),
                            len(gold), margin, alpha, resamples, seed)


def _encode(golden: Paired) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    gold = [normalize_label(str(g)) for g in golden.labels]
    names = sorted(set(gold))
    index = {n: i for i, n in enumerate(names)}

    def codes(answers: Sequence[str]) -> np.ndarray:
        return np.array([index.get(normalize_label(a), -1) for a in answers], dtype=np.int64)

    return (np.array([index[g] for g in gold], dtype=np.int64), codes(golden.incumbent),
            codes(golden.candidate), names)


def _macro_f1(gold: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Macro-F1 over the labels present in ``gold``: F1 = 2TP / (predicted + support)."""
    support = np.bincount(gold, minlength=k)
    tp = np.bincount(gold[gold == pred], minlength=k)
    predicted = np.bincount(pred[pred >= 0], minlength=k)
    present = support > 0
    f1 = 2 * tp[present] / (predicted[present] + support[present])
    return float(f1.mean())


def _per_label_f1(gold: list[str], pred: list[str]) -> dict[str, float]:
    out = {}
    for name in sorted(set(gold)):
        tp = sum(1 for g, p in zip(gold, pred, strict=True) if g == p == name)
        out[name] = 2 * tp / (sum(p == name for p in pred) + sum(g == name for g in gold))
    return out


def _mean(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


# ------------------------------------------------------------------ live gate
@dataclass
class Side:
    """What one version did for users in the window."""

    requests: int = 0
    errors: int = 0
    latencies_s: list[float] = field(default_factory=list)
    ratings: int = 0
    bad_ratings: int = 0


def live_decision(candidate: str, incumbent: str | None, cand: Side, inc: Side,
                  elapsed_s: float, cfg: CanarySettings) -> Decision:
    """Promote, roll back or hold, from both versions' window so far."""
    checks: list[Check] = []
    figures: dict[str, Any] = {
        "elapsed_s": round(elapsed_s, 1),
        "requests": {"candidate": cand.requests, "incumbent": inc.requests},
        "errors": {"candidate": cand.errors, "incumbent": inc.errors},
        "ratings": {"candidate": cand.ratings, "incumbent": inc.ratings},
        "bad_ratings": {"candidate": cand.bad_ratings, "incumbent": inc.bad_ratings},
    }
    enough = min(cand.requests, inc.requests) >= cfg.min_requests and \
        min(cand.ratings, inc.ratings) >= cfg.min_ratings
    checks.append(Check(
        "minimum sample", PASS if enough else HOLD, float(min(cand.requests, inc.requests)), None,
        f">= {cfg.min_requests} requests and >= {cfg.min_ratings} ratings a side",
        f"requests {cand.requests}/{inc.requests}, ratings {cand.ratings}/{inc.ratings} "
        "(candidate/production)"))
    if min(cand.requests, inc.requests) >= cfg.min_requests:
        err = two_proportions(cand.errors, cand.requests, inc.errors, inc.requests)
        checks.append(Check(
            "error rate (two-proportion z)", FAIL if err.p_worse < cfg.alpha else PASS, err.z,
            err.p_worse, f"fail if higher with p < {cfg.alpha}",
            f"{err.candidate_rate:.2%} vs {err.incumbent_rate:.2%}"))
        figures["error_rate"] = {"candidate": err.candidate_rate, "incumbent": err.incumbent_rate}
        if cand.latencies_s and inc.latencies_s:
            lat = mann_whitney(cand.latencies_s, inc.latencies_s)
            limit = cfg.max_p95_ratio if incumbent is not None else cfg.base_p95_ratio
            slower = limit is not None and lat.p_slower < cfg.alpha and lat.p95_ratio > limit
            checks.append(Check(
                "latency (Mann-Whitney U)", FAIL if slower else PASS, lat.u, lat.p_slower,
                f"fail if slower with p < {cfg.alpha} and p95 ratio > {limit}" if limit else
                "not gated against the base model (canary.base_p95_ratio)",
                f"p95 {lat.candidate_p95_s * 1000:.0f} ms vs {lat.incumbent_p95_s * 1000:.0f} ms "
                f"(ratio {lat.p95_ratio:.2f})"))
            figures["latency_p95_s"] = {"candidate": lat.candidate_p95_s,
                                        "incumbent": lat.incumbent_p95_s}
    if cfg.min_ratings > 0 and min(cand.ratings, inc.ratings) >= cfg.min_ratings:
        bad = two_proportions(cand.bad_ratings, cand.ratings, inc.bad_ratings, inc.ratings)
        checks.append(Check(
            "bad-rating rate (two-proportion z)", FAIL if bad.p_worse < cfg.alpha else PASS,
            bad.z, bad.p_worse, f"fail if higher with p < {cfg.alpha}",
            f"{bad.candidate_rate:.2%} vs {bad.incumbent_rate:.2%} of rated answers"))
        figures["bad_rating_rate"] = {"candidate": bad.candidate_rate,
                                      "incumbent": bad.incumbent_rate}
    if any(c.outcome == FAIL for c in checks):
        verdict = "rollback"
    elif not enough:
        verdict = "rollback" if elapsed_s >= cfg.max_window_s else "hold"
        if verdict == "rollback":
            checks.append(Check("maximum window", FAIL, elapsed_s, None,
                                f"a verdict within {cfg.max_window_s:.0f}s",
                                "the minimum sample never arrived: no evidence, no promotion"))
    elif elapsed_s < cfg.window_s:
        verdict = "hold"
        checks.append(Check("window", HOLD, elapsed_s, None, f">= {cfg.window_s:.0f}s",
                            "the window is still open"))
    else:
        verdict = "promote"
    return Decision("live", candidate, incumbent, verdict, checks, figures)
