"""One side of ``tuneloop/bench/drift.py``, in its own process.

``python -m tuneloop.bench._drift_worker SIDE PHASE DATA.npz OUT.json``: SIDE ``tuneloop`` (the main
environment) or ``evidently`` (the benchmark's own virtualenv, which lacks tuneloop's
dependencies, so nothing here imports tuneloop at module level); PHASE ``decide`` (every
window's decision, and tuneloop's score and MMD verdict) or ``time`` (seconds per check
over a fixed set of windows, after a warm-up).

DATA.npz holds ``vectors`` (every embedding) and, per window, ``<kind>_<w>_ref`` and
``<kind>_<w>_cur`` row indices into it. Each side makes its own default decision.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

TIMED_WINDOWS = 10


def _tuneloop() -> Callable[[np.ndarray, np.ndarray], dict[str, Any]]:
    from tuneloop.runtime.settings import DriftSettings
    from tuneloop.services.drift.core import detect_drift

    cfg = DriftSettings()

    def decide(ref: np.ndarray, cur: np.ndarray) -> dict[str, Any]:
        report = detect_drift(ref, cur, cfg)
        return {"drifted": report.drifted, "score": report.score,
                "mmd_drifted": report.mmd.p_value < cfg.alpha, "changed": report.changed}

    return decide


def _evidently() -> Callable[[np.ndarray, np.ndarray], dict[str, Any]]:
    import pandas as pd
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import model

    def decide(ref: np.ndarray, cur: np.ndarray) -> dict[str, Any]:
        # Evidently's default for EmbeddingsDrift: the classifier method, bootstrap only
        # below 1,000 reference rows (its report computes exactly this).
        cols = [f"e{i}" for i in range(ref.shape[1])]
        ref_df, cur_df = pd.DataFrame(ref, columns=cols), pd.DataFrame(cur, columns=cols)
        score, drifted, _ = model(bootstrap=len(ref) < 1000)(cur_df, ref_df)
        return {"drifted": bool(drifted), "score": float(score)}

    return decide


def main(side: str, phase: str, data_path: str, out_path: str) -> None:
    decide = _tuneloop() if side == "tuneloop" else _evidently()
    data = np.load(data_path)
    vectors = data["vectors"]
    names = sorted(k.removesuffix("_ref") for k in data.files if k.endswith("_ref"))

    def pair(name: str) -> tuple[np.ndarray, np.ndarray]:
        return vectors[data[f"{name}_ref"]], vectors[data[f"{name}_cur"]]

    if phase == "decide":
        result: dict[str, Any] = {name: decide(*pair(name)) for name in names}
    else:
        timed = [pair(n) for n in names if n.startswith("p0.2_")][:TIMED_WINDOWS]
        decide(*timed[0])  # warm-up: imports and first-call costs are not the check's
        started = time.perf_counter()
        for ref, cur in timed:
            decide(ref, cur)
        result = {"seconds_per_check": (time.perf_counter() - started) / len(timed),
                  "checks": len(timed)}
    with open(out_path, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(*sys.argv[1:5])
