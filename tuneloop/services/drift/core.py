"""Embedding drift: how much of the current traffic does the reference not cover?

The **score** is the estimated *novel share*: the share of current events (traffic,
duplicates counted) that come from somewhere the reference has no examples of. It is
near 0 when only the style or the mix of known topics moved, and grows with the share of
traffic from new topics, up to near 1 when everything is new. It comes from a
nearest-neighbour mixture estimate (rows are L2-normalised embeddings):

1. Each window is reduced to its distinct points (cosine above ``DUPLICATE_COSINE``
   counts as the same text), each carrying how often it occurred.
2. Pooled, every distinct point gets the share of its ``k`` nearest neighbours that are
   reference points. Current events like the reference score like reference points;
   events of a new topic have current neighbours only and score low.
3. In the region where the reference's own points score high (the upper half), novel
   events are absent, so the current share found there, divided by the reference's,
   estimates the covered share ``1 - novel``.
4. Calibration: the same estimate over permutations of the window labels (windows of
   the same sizes with nothing new) gives the estimator's bias, which is removed, and
   the p-value of the observed estimate.

A drift **decision** needs both: the novel share is significant (p below ``alpha``) and
at least ``min_novel_share`` (the practical threshold, in the score's own unit; below 0.1
is no shift worth a retrain).

Two classical two-sample tests still say whether the traffic **changed** at all, novel or
not (a new style, another mix of known topics); the report carries them as context:

* **MMD** (kernel two-sample test): a mixture of RBF kernels at 1/4, 1/2 and 1
  times the median-heuristic bandwidth, unbiased MMD², and a permutation p-value. All
  permutations are scored with one matrix product on the precomputed kernel matrix.
* **Domain classifier**: a linear classifier tries to tell the windows apart; its
  cross-validated ROC AUC is compared with the permutation distribution of the AUC of the
  same held-out scores (the window labels shuffled).

Changed means the MMD p-value is below ``alpha / 2`` or the AUC above its threshold at
level ``alpha / 2`` (Bonferroni).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tuneloop.runtime.settings import DriftSettings

log = logging.getLogger(__name__)

# Kernel widths as fractions of the median pairwise distance.
KERNEL_SCALES = (0.25, 0.5, 1.0)
# Embeddings this close are the same text (up to case and spacing).
DUPLICATE_COSINE = 0.999
# The reference's upper share of neighbour scores where novel events are taken as absent.
COVERED_REGION = 0.5


@dataclass(frozen=True)
class MMDResult:
    mmd2: float
    p_value: float
    bandwidth: float
    permutations: int


@dataclass(frozen=True)
class ClassifierResult:
    auc: float
    threshold: float
    p_value: float
    folds: int


@dataclass(frozen=True)
class NoveltyResult:
    """The novel-share estimate: ``share`` is calibrated, ``raw`` is before calibration."""

    share: float
    raw: float
    null_mean: float
    p_value: float
    neighbours: int
    permutations: int
    distinct_reference: int
    distinct_current: int


UNIT = "estimated share of current traffic the reference does not cover"


@dataclass
class DriftReport:
    """The outcome of one reference-vs-current comparison."""

    score: float
    p_value: float
    drifted: bool
    n_reference: int
    n_current: int
    mmd: MMDResult
    classifier: ClassifierResult
    alpha: float
    novelty: NoveltyResult
    min_novel_share: float
    changed: bool
    clusters: list[dict[str, Any]] = field(default_factory=list)
    reference_desc: str = ""
    current_desc: str = ""
    # Current-window events stamped far from their ingestion: {"future": n, "past": n}.
    clock: dict[str, int] = field(default_factory=dict)

    def methods(self) -> dict[str, Any]:
        return {"novelty": asdict(self.novelty), "unit": UNIT,
                "min_novel_share": self.min_novel_share, "changed": self.changed,
                "mmd": asdict(self.mmd), "classifier": asdict(self.classifier),
                "alpha": self.alpha, "occurred_at_flags": self.clock}

    def summary(self) -> str:
        verdict = "DRIFT" if self.drifted else "no drift"
        return (
            f"{verdict}: novel share {self.score:.2f} (p={self.p_value:.4f}, acts at "
            f">= {self.min_novel_share:.2f}); traffic {'changed' if self.changed else 'unchanged'} "
            f"(MMD²={self.mmd.mmd2:.5f} p={self.mmd.p_value:.4f}; AUC={self.classifier.auc:.3f} "
            f"threshold={self.classifier.threshold:.3f}) reference={self.n_reference} "
            f"current={self.n_current}{self._clock_note()}"
        )

    def _clock_note(self) -> str:
        flagged = {k: n for k, n in self.clock.items() if n}
        return ("; occurred_at far from ingestion: " + ", ".join(
            f"{n} from the {k}" for k, n in flagged.items())) if flagged else ""


def _check_windows(ref: np.ndarray, cur: np.ndarray, minimum: int = 10) -> None:
    for name, window in (("reference", ref), ("current", cur)):
        if window.ndim != 2:
            raise ValueError(f"{name} window has shape {window.shape}: pass a 2-D (n, dim) array")
        if len(window) < minimum:
            raise ValueError(
                f"{name} window has {len(window)} events; a drift test needs at least {minimum}. "
                "Wait for more feedback or widen the window (drift.*_window_* settings)."
            )
    if ref.shape[1] != cur.shape[1]:
        raise ValueError(
            f"reference dim {ref.shape[1]} != current dim {cur.shape[1]}: both windows must be "
            "embedded with the same model"
        )


def subsample(x: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``cap`` rows of ``x``, drawn without replacement."""
    if len(x) <= cap:
        return x
    return x[np.sort(rng.choice(len(x), cap, replace=False))]


def median_bandwidth(z: np.ndarray, rng: np.random.Generator, sample: int = 1000) -> float:
    """Median pairwise Euclidean distance over (a sample of) the pooled points."""
    pts = subsample(z, sample, rng).astype(np.float64)
    sq = np.sum(pts * pts, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * pts @ pts.T, 0.0)
    upper = d2[np.triu_indices(len(pts), k=1)]
    median = float(np.sqrt(np.median(upper))) if upper.size else 1.0
    return median if median > 1e-8 else 1.0


def mmd_test(
    x: np.ndarray, y: np.ndarray, permutations: int, rng: np.random.Generator
) -> MMDResult:
    """Unbiased MMD² between ``x`` and ``y`` with a permutation p-value.

    With ``a`` the 0/1 indicator of the first sample and ``K`` the pooled kernel
    matrix (diagonal 1 for RBF), ``a'Ka``, ``a'K1`` and ``1'K1`` give every term of
    the unbiased estimator, so the observed split and all permuted splits are
    one ``K @ A`` product, ``A`` of shape (n + m, permutations + 1).
    """
    n, m = len(x), len(y)
    z = np.concatenate([x, y]).astype(np.float32)
    bandwidth = median_bandwidth(z, rng)
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * (z @ z.T), 0.0)
    # A mixture of widths: the median width sees global shifts, the narrower ones a new
    # cluster that takes a small share of traffic.
    kernel = np.zeros_like(d2)
    for scale in KERNEL_SCALES:
        kernel += np.exp(-d2 / np.float32(2 * (scale * bandwidth) ** 2))
    kernel /= np.float32(len(KERNEL_SCALES))
    np.fill_diagonal(kernel, 1.0)
    del d2

    total = n + m
    assign = np.zeros((total, permutations + 1), dtype=np.float32)
    assign[:n, 0] = 1.0
    for j in range(1, permutations + 1):
        assign[rng.permutation(total)[:n], j] = 1.0
    k_assign = kernel @ assign  # (total, B)
    k_row = kernel.sum(axis=1, dtype=np.float64)  # K1
    all_sum = float(k_row.sum())  # 1'K1
    aka = np.einsum("ij,ij->j", assign, k_assign, dtype=np.float64)
    ak1 = assign.T.astype(np.float64) @ k_row
    akb = ak1 - aka
    bkb = all_sum - 2 * ak1 + aka
    stats = (aka - n) / (n * (n - 1)) + (bkb - m) / (m * (m - 1)) - 2 * akb / (n * m)
    observed = float(stats[0])
    p_value = float((1 + np.sum(stats[1:] >= observed)) / (1 + permutations))
    return MMDResult(mmd2=observed, p_value=p_value, bandwidth=bandwidth, permutations=permutations)


def auc_with_permutations(
    scores: np.ndarray, labels: np.ndarray, permutations: int, rng: np.random.Generator
) -> tuple[float, np.ndarray]:
    """ROC AUC of ``scores`` for ``labels`` (1 = current), and its permutation null.

    AUC is the Mann-Whitney statistic: from the ranks of the scores, a labelling's
    AUC is its positives' rank sum, so shuffled labellings cost one gather each.
    """
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    pos = int(labels.sum())
    neg = len(labels) - pos
    offset = pos * (pos + 1) / 2

    def auc_of(mask: np.ndarray) -> np.ndarray:
        return (ranks @ mask.T - offset) / (pos * neg)

    observed = float(auc_of(labels.astype(np.float64)[None, :])[0])
    shuffled = np.stack([rng.permutation(labels) for _ in range(permutations)]).astype(np.float64)
    return observed, auc_of(shuffled)


def ridge_cv_scores(
    features: np.ndarray, labels: np.ndarray, folds: int, rng: np.random.Generator,
    ridge: float = 1.0,
) -> np.ndarray:
    """Held-out scores of a ridge-regularised linear discriminant, ``folds``-fold.

    Closed form: each fold solves one ``(dim + 1)``-square system built from the
    full Gram matrix minus the held-out rows, so five folds on thousands of
    events take milliseconds (an iterative logistic regression takes seconds).
    Folds are stratified: each window is spread evenly over them.
    """
    x = np.concatenate([features, np.ones((len(features), 1), features.dtype)], axis=1)
    x = x.astype(np.float64)
    target = np.where(labels == 1, 1.0, -1.0)
    fold_of = np.empty(len(labels), dtype=np.int64)
    for value in (0, 1):
        idx = np.flatnonzero(labels == value)
        fold_of[rng.permutation(idx)] = np.arange(len(idx)) % folds
    gram, xty = x.T @ x, x.T @ target
    penalty = ridge * np.eye(x.shape[1])
    penalty[-1, -1] = 0.0  # the intercept is not shrunk
    scores = np.empty(len(labels))
    for k in range(folds):
        held = fold_of == k
        xh = x[held]
        weights = np.linalg.solve(gram - xh.T @ xh + penalty, xty - xh.T @ target[held])
        scores[held] = xh @ weights
    return scores


def classifier_test(
    x: np.ndarray,
    y: np.ndarray,
    level: float,
    permutations: int,
    rng: np.random.Generator,
    fixed_threshold: float = 0.0,
    folds: int = 5,
) -> ClassifierResult:
    """Cross-validated domain classifier: can a model tell ``y`` from ``x``?

    Held-out scores come from models that never saw the scored event, so under
    no drift they carry no information about its window (cross-validation even
    biases the AUC slightly below 0.5, which makes the test conservative).
    The threshold is the ``1 - level`` quantile of that null unless
    ``fixed_threshold`` is set.
    """
    features = np.concatenate([x, y])
    labels = np.concatenate([np.zeros(len(x), dtype=np.int64), np.ones(len(y), dtype=np.int64)])
    folds = max(2, min(folds, len(x), len(y)))
    scores = ridge_cv_scores(features, labels, folds, rng)
    auc, null = auc_with_permutations(scores, labels, permutations, rng)
    threshold = fixed_threshold or float(np.quantile(null, 1 - level))
    p_value = float((1 + np.sum(null >= auc)) / (1 + permutations))
    return ClassifierResult(auc=auc, threshold=threshold, p_value=p_value, folds=folds)


def distinct(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of ``x`` (cosine above ``DUPLICATE_COSINE`` is the same row) and
    how often each occurred, first occurrence kept."""
    sims = x @ x.T
    owner = np.full(len(x), -1)
    keep: list[int] = []
    for i in range(len(x)):
        if owner[i] < 0:
            owner[(sims[i] > DUPLICATE_COSINE) & (owner < 0)] = len(keep)
            keep.append(i)
    return x[keep], np.bincount(owner, minlength=len(keep)).astype(np.float64)


def _novel_shares(neighbours: np.ndarray, labels: np.ndarray,
                  weights: np.ndarray | None = None) -> np.ndarray:
    """``1 - covered`` for each row of ``labels`` (window labellings, ``(B, n)`` booleans,
    True = current): the current share in the reference's high-score region over the
    reference's share there, every labelling in one pass.

    Reference points with no current neighbour are left out: a topic that current traffic
    no longer asks about says nothing about what in current traffic is new. ``weights``
    (one per point) count a current point as often as it occurred.
    """
    near_current = labels[:, neighbours]  # (B, n, k)
    score = 1.0 - near_current.mean(axis=2)
    ref = ~labels & near_current.any(axis=2)
    del near_current
    n_ref = ref.sum(axis=1)
    # The median of each row's reference scores, as np.quantile computes it (linear).
    ordered = np.sort(np.where(ref, score, np.inf), axis=1)
    position = (np.maximum(n_ref, 1) - 1) * (1 - COVERED_REGION)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, np.maximum(n_ref - 1, 0))
    rows = np.arange(len(labels))
    lo_value, hi_value = ordered[rows, low], ordered[rows, high]
    cut = lo_value + (position - low) * (hi_value - lo_value)
    cut = np.where(high == low, lo_value, cut)
    above = score >= cut[:, None]
    in_ref = (above & ref).sum(axis=1) / np.maximum(n_ref, 1)
    w = np.ones(labels.shape[1]) if weights is None else weights
    in_cur = ((above & labels) @ w) / (labels @ w)
    shares = 1.0 - np.minimum(1.0, in_cur / np.where(in_ref > 0, in_ref, np.inf))
    return np.where(n_ref > 0, shares, 1.0)


def novelty_test(x: np.ndarray, y: np.ndarray, neighbours: int, permutations: int,
                 rng: np.random.Generator) -> NoveltyResult:
    """Estimate the share of ``y`` (current) that ``x`` (reference) does not cover.

    Distinct points are the unit of the neighbour graph and of the permutations (a
    question asked ten times is one point, so repeats do not make a window look novel);
    the share is of events, each distinct point weighted by its occurrences.
    """
    ref, _ = distinct(x.astype(np.float32))
    cur, weights = distinct(y.astype(np.float32))
    pooled = np.concatenate([ref, cur])
    is_current = np.concatenate([np.zeros(len(ref), bool), np.ones(len(cur), bool)])
    k = max(1, min(neighbours, len(pooled) - 1))
    sims = pooled @ pooled.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    del sims
    observed = float(_novel_shares(nearest, is_current[None])[0])
    raw = float(_novel_shares(nearest, is_current[None],
                              np.concatenate([np.ones(len(ref)), weights]))[0])
    shuffled = np.stack([rng.permutation(is_current) for _ in range(permutations)])
    batch = max(1, 4_000_000 // max(1, nearest.size))  # about 40 MB of neighbour labels
    null = np.concatenate([_novel_shares(nearest, shuffled[i:i + batch])
                           for i in range(0, permutations, batch)])
    bias = float(null.mean())
    share = float(np.clip((raw - bias) / (1.0 - bias), 0.0, 1.0)) if bias < 1 else 0.0
    p_value = float((1 + np.sum(null >= observed)) / (1 + permutations))
    return NoveltyResult(share=share, raw=raw, null_mean=bias, p_value=p_value, neighbours=k,
                         permutations=permutations, distinct_reference=len(ref),
                         distinct_current=len(cur))


def detect_drift(ref: np.ndarray, cur: np.ndarray, cfg: DriftSettings) -> DriftReport:
    """Compare two windows of normalised embeddings; pure and deterministic for ``cfg.seed``.

    Each window is subsampled to ``cfg.max_points``. Raises ``ValueError`` for
    windows that are too small or of different dimension.
    """
    _check_windows(ref, cur)
    rng = np.random.default_rng(cfg.seed)
    x = subsample(ref, cfg.max_points, rng)
    y = subsample(cur, cfg.max_points, rng)
    novelty = novelty_test(x, y, cfg.neighbours, cfg.permutations, rng)
    mmd = mmd_test(x, y, cfg.permutations, rng)
    # Bonferroni: each test runs at alpha / 2, so together they flag a change at most alpha.
    level = cfg.alpha / 2
    clf = classifier_test(
        x, y, level, max(cfg.permutations, 1000), rng, fixed_threshold=cfg.auc_threshold
    )
    changed = mmd.p_value < level or clf.auc > clf.threshold
    drifted = novelty.p_value < cfg.alpha and novelty.share >= cfg.min_novel_share
    return DriftReport(
        score=novelty.share, p_value=novelty.p_value, drifted=drifted, n_reference=len(ref),
        n_current=len(cur), mmd=mmd, classifier=clf, alpha=cfg.alpha, novelty=novelty,
        min_novel_share=cfg.min_novel_share, changed=changed,
    )
