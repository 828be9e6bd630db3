"""Drift's entry point: one check, from the windows in DuckDB to a stored report.

:func:`run_check` is what the ``detect_drift`` flow (and through it ``tuneloop drift``)
and the tests call; the flow only adds its artifact, events and run name around it.
"""

from __future__ import annotations

import numpy as np

from tuneloop.runtime.settings import DriftSettings
from tuneloop.services.drift.clusters import what_drifted
from tuneloop.services.drift.core import DriftReport, detect_drift
from tuneloop.services.drift.embeddings import Embedder, Progress, embed_texts
from tuneloop.services.drift.store import Window, load_windows, save_report
from tuneloop.services.store.database import AnyStore


def run_check(
    store: AnyStore, embedder: Embedder, cfg: DriftSettings, alias: str,
    progress: Progress | None = None,
) -> tuple[str, DriftReport]:
    """Load both windows, embed them (cached), test, explain and persist one report;
    returns the report's id and the report.

    ``alias`` is the served alias whose production adapter's training data is the
    reference (``serving.alias``; see :mod:`tuneloop.services.drift.store`). The store is
    held for each read or write only, never while embedding or testing. Raises
    :class:`~tuneloop.services.drift.store.NotEnoughEvents` when a window is too small.
    """
    with store.connect() as con:
        ref, cur = load_windows(con, cfg, alias)
    vectors, _ = embed_texts(store, embedder, ref.texts + cur.texts, progress)
    report = compare_windows(ref, cur, vectors, cfg)
    with store.connect() as con:
        report_id = save_report(con, report)
    return report_id, report


def compare_windows(ref: Window, cur: Window, vectors: np.ndarray,
                    cfg: DriftSettings) -> DriftReport:
    """The report on two windows whose embeddings are ``vectors`` (reference rows first):
    the tests, and the clusters that explain a change. Pure."""
    ref_vec, cur_vec = vectors[: len(ref)], vectors[len(ref) :]
    report = detect_drift(ref_vec, cur_vec, cfg)
    report.reference_desc, report.current_desc = ref.desc, cur.desc
    report.clock = dict(cur.clock)
    changes = what_drifted(ref_vec, cur_vec, cur.texts, cfg, cur.labels, ref.labels)
    report.clusters = [change.to_dict() for change in changes]
    return report
