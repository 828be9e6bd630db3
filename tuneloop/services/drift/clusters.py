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

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from tuneloop.runtime.settings import DriftSettings
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


def _z(cur: int, n_cur: int, ref: int, n_ref: int) -> float:
    pooled = (cur + ref) / (n_cur + n_ref)
    se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / n_cur + 1 / n_ref))
    return (cur / n_cur - ref / n_ref) / se


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
    (and ``ref``). Pure and deterministic for ``cfg.seed``.
    """
    from sklearn.cluster import KMeans

    if len(cur_texts) != len(cur):
        raise ValueError(f"{len(cur_texts)} texts for {len(cur)} current vectors: pass one per row")
    rng = np.random.default_rng(cfg.seed + 1)
    ref_idx = np.arange(len(ref))
    if len(ref) > cfg.max_points:
        ref_idx = np.sort(rng.choice(len(ref), cfg.max_points, replace=False))
    cur_idx = np.arange(len(cur))
    if len(cur) > cfg.max_points:
        cur_idx = np.sort(rng.choice(len(cur), cfg.max_points, replace=False))
    x, y = ref[ref_idx], cur[cur_idx]
    pooled = np.concatenate([x, y])
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    pooled = pooled / np.maximum(norms, 1e-12)
    k = cluster_count(len(pooled), cfg.clusters)
    # Random initialisation: k-means++ seeding costs more than the clustering here.
    km = KMeans(n_clusters=k, init="random", n_init=2, random_state=cfg.seed).fit(pooled)
    assign = km.labels_
    ref_assign, cur_assign = assign[: len(x)], assign[len(x) :]
    n_ref, n_cur = len(x), len(y)
    known = {lab for lab in ref_labels or () if lab}
    cur_of = [cur_labels[int(i)] for i in cur_idx] if cur_labels is not None else None
    ref_of = [ref_labels[int(i)] for i in ref_idx] if ref_labels is not None else None
    # Each label the reference never had is reported once, by the cluster holding most
    # of its events, so a new intent spread over a few clusters is still named.
    home: dict[str, int] = {}
    if cur_of is not None and ref_of:
        per_label = Counter((lab, int(c)) for lab, c in zip(cur_of, cur_assign, strict=True)
                            if lab and lab not in known)
        totals = Counter(lab for lab in cur_of if lab and lab not in known)
        for (lab, c), n in sorted(per_label.items(), key=lambda item: -item[1]):
            if totals[lab] >= cfg.min_cluster_events and lab not in home and n > 0:
                home[lab] = c

    changes: list[ClusterChange] = []
    for c in range(k):
        cur_members = np.flatnonzero(cur_assign == c)
        ref_members = np.flatnonzero(ref_assign == c)
        size, ref_size = len(cur_members), len(ref_members)
        if size < cfg.min_cluster_events and c not in home.values():
            continue
        share, ref_share = size / n_cur, ref_size / n_ref
        z = _z(size, n_cur, ref_size, n_ref)
        member_labels = [cur_of[i] for i in cur_members] if cur_of is not None else []
        unseen = Counter(lab for lab in member_labels if lab and lab not in known)
        new_labels = sorted((lab for lab in unseen if home.get(lab) == c), key=lambda lab: -unseen[lab])
        if z >= MIN_Z and ref_share <= NEW_REFERENCE_FRACTION * share:
            status = "new"
        elif z >= MIN_Z and share >= cfg.grew_ratio * ref_share:
            status = "grew"
        elif new_labels:
            status = "new labels"
        else:
            continue
        # Examples nearest the centre read as the cluster's typical message.
        dist = np.linalg.norm(pooled[len(x) + cur_members] - km.cluster_centers_[c], axis=1)
        nearest = cur_members[np.argsort(dist)[: cfg.examples_per_cluster]]
        examples = [_example(cur_texts[int(cur_idx[i])]) for i in nearest]
        labels: list[LabelShift] = []
        if cur_of is not None:
            labels = _label_shifts(
                member_labels, [ref_of[i] for i in ref_members] if ref_of else [],
                n_cur, n_ref, first=new_labels,
            )
        name = labels[0].label if labels else examples[0]
        changes.append(
            ClusterChange(
                cluster=c, status=status, name=name, size=size, share=round(share, 4),
                reference_share=round(ref_share, 4),
                growth=round(share / ref_share, 2) if ref_share else None,
                z=round(z, 2), labels=labels, examples=examples, new_labels=new_labels,
            )
        )
    changes.sort(key=lambda ch: -(ch.share - ch.reference_share))
    return changes
