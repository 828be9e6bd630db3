"""What drifted: clusters of the current window that are new or grew.

Reference and current embeddings are clustered together (k-means on the unit
sphere), and each cluster's share of the current window is compared with its
share of the reference. A cluster the reference barely touches is **new**; one
whose share grew by ``grew_ratio`` or more is **grew**. Both must also be
significant under a two-proportion z-test, so sampling noise in a quiet window
is not reported.

Where feedback carries labels, a cluster is also reported as **new labels** when
at least ``min_cluster_events`` of its current events carry a label the whole
reference window never had: a new intent that reads like an old one (and so
lands in an old cluster) is still named. Each reported cluster is named by the
labels that explain its change and shown with PII-redacted examples.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from tuneloop.runtime.settings import DriftSettings
from tuneloop.services.canary.stats import two_proportions
from tuneloop.services.feedback.redaction import redact

# A reference share below this fraction of the current share makes a cluster "new".
NEW_REFERENCE_FRACTION = 0.1
MIN_Z = 3.0
EXAMPLE_CHARS = 160


@dataclass(frozen=True)
class LabelShift:
    label: str
    current: int
    reference: int


@dataclass(frozen=True)
class ClusterChange:
    cluster: int
    status: str  # "new", "grew" or "new labels"
    name: str
    size: int
    share: float
    reference_share: float
    growth: float | None  # None when the reference has no events here
    z: float
    labels: list[LabelShift]
    examples: list[str]
    new_labels: list[str]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def cluster_count(n_points: int, configured: int = 0) -> int:
    """``configured`` if set, else about one cluster per 30 events, within [8, 80]."""
    if configured:
        return min(configured, n_points)
    return int(min(n_points, max(8, min(80, n_points // 30))))


def _example(text: str) -> str:
    clean = " ".join(redact(text).text.split())
    return clean if len(clean) <= EXAMPLE_CHARS else clean[: EXAMPLE_CHARS - 1] + "…"


def _label_shifts(
    cur_labels: Sequence[str | None], ref_labels: Sequence[str | None], n_cur: int, n_ref: int,
    first: Sequence[str] = (), top: int = 3,
) -> list[LabelShift]:
    """Labels of a cluster ranked by how much their share grew; ``first`` lead."""
    cur = Counter(lab for lab in cur_labels if lab)
    ref = Counter(lab for lab in ref_labels if lab)
    ranked = sorted(
        cur, key=lambda lab: (lab not in first, -(cur[lab] / n_cur - ref[lab] / n_ref), lab)
    )
    return [LabelShift(lab, cur[lab], ref[lab]) for lab in ranked[: max(top, len(first))]]


def what_drifted(
    ref: np.ndarray,
    cur: np.ndarray,
    cur_texts: Sequence[str],
    cfg: DriftSettings,
    cur_labels: Sequence[str | None] | None = None,
    ref_labels: Sequence[str | None] | None = None,
) -> list[ClusterChange]:
    """Clusters of ``cur`` that are new or grew against ``ref``, largest change first.

    ``cur_texts`` (and the optional label lists) align with the rows of ``cur``
    (and ``ref``). Pure and deterministic for ``cfg.seed``. Raises ``ValueError`` when
    ``cur_texts`` does not hold one text per row of ``cur``.
    """
    if len(cur_texts) != len(cur):
        raise ValueError(f"{len(cur_texts)} texts for {len(cur)} current vectors: pass one per row")
    ref_idx, cur_idx = _subsample(len(ref), len(cur), cfg)
    clustering = _cluster(ref[ref_idx], cur[cur_idx], cfg)
    labels = _labels(clustering, ref_idx, cur_idx, cur_labels, ref_labels, cfg)
    changes = [change for c in range(clustering.k)
               if (change := _change(c, clustering, labels, cur_idx, cur_texts, cfg))]
    changes.sort(key=lambda ch: -(ch.share - ch.reference_share))
    return changes


@dataclass(frozen=True)
class _Clustering:
    """Both windows (subsampled) clustered together on the unit sphere."""

    pooled: np.ndarray  # unit vectors: reference rows, then current rows
    centres: np.ndarray
    ref_assign: np.ndarray  # cluster of each reference row
    cur_assign: np.ndarray  # cluster of each current row

    @property
    def k(self) -> int:
        return len(self.centres)


@dataclass(frozen=True)
class _Labels:
    """Labels of the subsampled rows, where feedback carries them."""

    cur: list[str | None] | None
    ref: list[str | None] | None
    known: frozenset[str]  # every label the whole reference window has
    home: dict[str, int]  # a label the reference never had -> the cluster that names it


def _subsample(n_ref: int, n_cur: int, cfg: DriftSettings) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of each window, at most ``cfg.max_points`` each, in order."""
    rng = np.random.default_rng(cfg.seed + 1)
    ref_idx = np.arange(n_ref)
    if n_ref > cfg.max_points:
        ref_idx = np.sort(rng.choice(n_ref, cfg.max_points, replace=False))
    cur_idx = np.arange(n_cur)
    if n_cur > cfg.max_points:
        cur_idx = np.sort(rng.choice(n_cur, cfg.max_points, replace=False))
    return ref_idx, cur_idx


def _cluster(x: np.ndarray, y: np.ndarray, cfg: DriftSettings) -> _Clustering:
    from sklearn.cluster import KMeans

    pooled = np.concatenate([x, y])
    pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    k = cluster_count(len(pooled), cfg.clusters)
    # Random initialisation: k-means++ seeding costs more than the clustering here.
    km = KMeans(n_clusters=k, init="random", n_init=2, random_state=cfg.seed).fit(pooled)
    return _Clustering(pooled, km.cluster_centers_, km.labels_[: len(x)], km.labels_[len(x) :])


def _labels(clustering: _Clustering, ref_idx: np.ndarray, cur_idx: np.ndarray,
            cur_labels: Sequence[str | None] | None, ref_labels: Sequence[str | None] | None,
            cfg: DriftSettings) -> _Labels:
    known = frozenset(lab for lab in ref_labels or () if lab)
    cur_of = [cur_labels[int(i)] for i in cur_idx] if cur_labels is not None else None
    ref_of = [ref_labels[int(i)] for i in ref_idx] if ref_labels is not None else None
    home = _homes(cur_of, clustering.cur_assign, known, cfg) if cur_of is not None and ref_of \
        else {}
    return _Labels(cur_of, ref_of, known, home)


def _homes(cur_of: list[str | None], cur_assign: np.ndarray, known: frozenset[str],
           cfg: DriftSettings) -> dict[str, int]:
    """Each label the reference never had is reported once, by the cluster holding most
    of its events, so a new intent spread over a few clusters is still named."""
    per_label = Counter((lab, int(c)) for lab, c in zip(cur_of, cur_assign, strict=True)
                        if lab and lab not in known)
    totals = Counter(lab for lab in cur_of if lab and lab not in known)
    home: dict[str, int] = {}
    for (lab, c), n in sorted(per_label.items(), key=lambda item: -item[1]):
        if totals[lab] >= cfg.min_cluster_events and lab not in home and n > 0:
            home[lab] = c
    return home


def _change(c: int, clustering: _Clustering, labels: _Labels, cur_idx: np.ndarray,
            cur_texts: Sequence[str], cfg: DriftSettings) -> ClusterChange | None:
    """Cluster ``c`` as a reported change, or None when it did not change enough."""
    cur_members = np.flatnonzero(clustering.cur_assign == c)
    ref_members = np.flatnonzero(clustering.ref_assign == c)
    size, ref_size = len(cur_members), len(ref_members)
    if size < cfg.min_cluster_events and c not in labels.home.values():
        return None
    n_ref, n_cur = len(clustering.ref_assign), len(clustering.cur_assign)
    share, ref_share = size / n_cur, ref_size / n_ref
    z = two_proportions(size, n_cur, ref_size, n_ref).z
    member_labels = [labels.cur[i] for i in cur_members] if labels.cur is not None else []
    unseen = Counter(lab for lab in member_labels if lab and lab not in labels.known)
    new_labels = sorted((lab for lab in unseen if labels.home.get(lab) == c),
                        key=lambda lab: -unseen[lab])
    status = _status(z, share, ref_share, bool(new_labels), cfg)
    if status is None:
        return None
    examples = _examples(c, clustering, cur_members, cur_idx, cur_texts, cfg)
    shifts: list[LabelShift] = []
    if labels.cur is not None:
        ref_member_labels = [labels.ref[i] for i in ref_members] if labels.ref else []
        shifts = _label_shifts(member_labels, ref_member_labels, n_cur, n_ref, first=new_labels)
    return ClusterChange(
        cluster=c, status=status, name=shifts[0].label if shifts else examples[0], size=size,
        share=round(share, 4), reference_share=round(ref_share, 4),
        growth=round(share / ref_share, 2) if ref_share else None,
        z=round(z, 2), labels=shifts, examples=examples, new_labels=new_labels,
    )


def _status(z: float, share: float, ref_share: float, names_new_labels: bool,
            cfg: DriftSettings) -> str | None:
    if z >= MIN_Z and ref_share <= NEW_REFERENCE_FRACTION * share:
        return "new"
    if z >= MIN_Z and share >= cfg.grew_ratio * ref_share:
        return "grew"
    if names_new_labels:
        return "new labels"
    return None


def _examples(c: int, clustering: _Clustering, cur_members: np.ndarray, cur_idx: np.ndarray,
              cur_texts: Sequence[str], cfg: DriftSettings) -> list[str]:
    """The messages nearest the cluster's centre: they read as its typical message."""
    offset = len(clustering.ref_assign)
    dist = np.linalg.norm(clustering.pooled[offset + cur_members] - clustering.centres[c], axis=1)
    nearest = cur_members[np.argsort(dist)[: cfg.examples_per_cluster]]
    return [_example(cur_texts[int(cur_idx[i])]) for i in nearest]
