"""The statistical tests the canary decides with. Pure functions, no I/O.

- :func:`mcnemar`: exact McNemar test on paired right/wrong outcomes (the same
  examples answered by two versions), one-sided in either direction.
- :func:`paired_bootstrap`: a paired bootstrap of a metric's difference (macro-F1, a
  mean per-example score) against a non-inferiority margin, and for an improvement.
- :func:`two_proportions`: one-sided two-proportion z-test (error rate, bad-rating rate).
- :func:`mann_whitney`: one-sided Mann-Whitney U on latencies, plus the p95 ratio.
- :func:`holm`: Holm-Bonferroni adjustment for many per-label tests at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class Paired:
    """Discordant pairs of two versions answering the same examples."""

    n: int
    only_candidate: int  # candidate right, incumbent wrong
    only_incumbent: int  # incumbent right, candidate wrong
    p_better: float  # one-sided: the candidate is right more often
    p_worse: float  # one-sided: the candidate is wrong more often


def mcnemar(incumbent_right: Sequence[bool], candidate_right: Sequence[bool]) -> Paired:
    """Exact McNemar test: a binomial test on the discordant pairs."""
    if len(incumbent_right) != len(candidate_right):
        raise ValueError(f"{len(incumbent_right)} incumbent outcomes for "
                         f"{len(candidate_right)} candidate outcomes: pair them")
    b = sum(1 for i, c in zip(incumbent_right, candidate_right, strict=True) if c and not i)
    c_ = sum(1 for i, c in zip(incumbent_right, candidate_right, strict=True) if i and not c)
    if b + c_ == 0:
        return Paired(len(candidate_right), 0, 0, 1.0, 1.0)
    p_better = float(sps.binomtest(b, b + c_, 0.5, alternative="greater").pvalue)
    p_worse = float(sps.binomtest(c_, b + c_, 0.5, alternative="greater").pvalue)
    return Paired(len(candidate_right), b, c_, p_better, p_worse)


def sign_test(wins: int, losses: int) -> Paired:
    """A sign test of the candidate's wins against its losses (ties left out): McNemar's
    binomial test, a win being a pair only the candidate got right."""
    return mcnemar([False] * wins + [True] * losses, [True] * wins + [False] * losses)


@dataclass(frozen=True)
class Bootstrap:
    """Difference ``candidate - incumbent`` of a metric, resampled over examples."""

    delta: float
    low: float  # lower bound of the two-sided (1 - alpha) interval
    high: float
    p_beyond_margin: float  # share of resamples with delta >= -margin: small = worse by > margin
    p_not_better: float = 1.0  # share of resamples with delta <= 0: small = better


def paired_bootstrap(
    metric: Callable[[np.ndarray], float],
    candidate_metric: Callable[[np.ndarray], float],
    n: int,
    margin: float,
    alpha: float,
    resamples: int = 2000,
    seed: int = 0,
) -> Bootstrap:
    """Resample example indices with replacement; ``metric(idx)`` scores the incumbent on them.

    The p-value is for "the candidate is worse than the incumbent by more than
    ``margin``": the share of resamples in which it is not; ``p_not_better`` is for "the
    candidate is better": the share in which it is not.
    """
    if n == 0:
        raise ValueError("nothing to resample: no examples")
    rng = np.random.default_rng(seed)
    everything = np.arange(n)
    delta = candidate_metric(everything) - metric(everything)
    deltas = np.empty(resamples)
    for i in range(resamples):
        idx = rng.integers(0, n, n)
        deltas[i] = candidate_metric(idx) - metric(idx)
    low, high = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    # +1 smoothing: a p-value from resampling is never exactly 0.
    p = (1 + int(np.sum(deltas >= -margin))) / (resamples + 1)
    p_not_better = (1 + int(np.sum(deltas <= 0))) / (resamples + 1)
    return Bootstrap(float(delta), float(low), float(high), p, p_not_better)


@dataclass(frozen=True)
class Proportions:
    """Candidate rate vs incumbent rate of an event (errors, bad ratings)."""

    candidate_rate: float
    incumbent_rate: float
    z: float
    p_worse: float  # one-sided: the candidate's rate is higher


def two_proportions(candidate_hits: int, candidate_n: int, incumbent_hits: int,
                    incumbent_n: int) -> Proportions:
    """Pooled two-proportion z-test, one-sided (candidate higher)."""
    if candidate_n <= 0 or incumbent_n <= 0:
        raise ValueError("both sides need at least one observation")
    pc, pi = candidate_hits / candidate_n, incumbent_hits / incumbent_n
    pooled = (candidate_hits + incumbent_hits) / (candidate_n + incumbent_n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / candidate_n + 1 / incumbent_n))
    if se == 0:
        return Proportions(pc, pi, 0.0, 1.0)
    z = (pc - pi) / se
    return Proportions(pc, pi, z, float(sps.norm.sf(z)))


@dataclass(frozen=True)
class Latency:
    """Candidate latencies vs incumbent latencies."""

    u: float
    p_slower: float  # one-sided Mann-Whitney U: the candidate is slower
    candidate_p95_s: float
    incumbent_p95_s: float

    @property
    def p95_ratio(self) -> float:
        return self.candidate_p95_s / self.incumbent_p95_s if self.incumbent_p95_s > 0 else 1.0


def mann_whitney(candidate_s: Sequence[float], incumbent_s: Sequence[float]) -> Latency:
    if not candidate_s or not incumbent_s:
        raise ValueError("both sides need at least one latency")
    result = sps.mannwhitneyu(candidate_s, incumbent_s, alternative="greater")
    return Latency(float(result.statistic), float(result.pvalue),
                   float(np.percentile(candidate_s, 95)), float(np.percentile(incumbent_s, 95)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (family-wise error control)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
