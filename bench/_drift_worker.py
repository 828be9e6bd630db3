"""One side of ``bench/drift.py``, run in its own process so peak memory is its own.

``python bench/_drift_worker.py SIDE DATA.npz OUT.json`` with SIDE ``tuneloop`` (the
main environment) or ``evidently`` (the benchmark's own virtualenv, which lacks
tuneloop's dependencies, so nothing here imports tuneloop at module level).

DATA.npz holds ``ref`` (the 5,000 reference embeddings), ``timed`` (the 5,000
current embeddings the timed check runs on) and ``null_*`` / ``drift_*`` windows
for detection and false-positive rates. The timed check is the full report a
user would run: tuneloop's ``detect_drift`` plus its cluster report, Evidently's
``Report([EmbeddingsDrift])`` with its default method. Rates use each side's
default decision on every window.
"""

from __future__ import annotations

import json
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np


def _tuneloop() -> tuple[Callable[[np.ndarray, np.ndarray], Any], Callable[..., bool]]:
    from services.clusters import what_drifted
    from services.drift import detect_drift
    from services.settings import DriftSettings

    cfg = DriftSettings()

    def full(ref: np.ndarray, cur: np.ndarray) -> Any:
        report = detect_drift(ref, cur, cfg)
        what_drifted(ref, cur, ["-"] * len(cur), cfg)
        return report.drifted

    def decide(ref: np.ndarray, cur: np.ndarray) -> bool:
        return bool(detect_drift(ref, cur, cfg).drifted)

    return full, decide


def _evidently() -> tuple[Callable[[np.ndarray, np.ndarray], Any], Callable[..., bool]]:
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import model
    from evidently.metrics import EmbeddingsDrift

    def frames(ref: np.ndarray, cur: np.ndarray) -> tuple[Any, Any, list[str]]:
        cols = [f"e{i}" for i in range(ref.shape[1])]
        return pd.DataFrame(ref, columns=cols), pd.DataFrame(cur, columns=cols), cols

    def full(ref: np.ndarray, cur: np.ndarray) -> Any:
        ref_df, cur_df, cols = frames(ref, cur)
        definition = DataDefinition(numerical_columns=cols, embeddings={"emb": cols})
        report = Report([EmbeddingsDrift(embeddings_name="emb")])
        return report.run(
            current_data=Dataset.from_pandas(cur_df, data_definition=definition),
            reference_data=Dataset.from_pandas(ref_df, data_definition=definition),
        )

    def decide(ref: np.ndarray, cur: np.ndarray) -> bool:
        # Evidently's default for EmbeddingsDrift: the classifier method, bootstrap only
        # below 1,000 reference rows (the report computes exactly this).
        ref_df, cur_df, _ = frames(ref, cur)
        _, drifted, _ = model(bootstrap=len(ref) < 1000)(cur_df, ref_df)
        return bool(drifted)

    return full, decide


def main(side: str, data_path: str, out_path: str, repeats: int = 1) -> None:
    full, decide = _tuneloop() if side == "tuneloop" else _evidently()
    data = np.load(data_path)
    ref, timed = data["ref"], data["timed"]
    # Warm-up on a small slice: imports and first-call costs are not the check's.
    full(ref[:200], timed[:200])
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        full(ref, timed)
        seconds.append(time.perf_counter() - started)
    # Peak memory in a separate, untimed run: tracemalloc sees numpy and pandas
    # buffers (they report to it) but slows pure-Python code down.
    tracemalloc.start()
    full(ref, timed)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    null = [decide(ref, data[k]) for k in sorted(data.files) if k.startswith("null_")]
    drift = [decide(ref, data[k]) for k in sorted(data.files) if k.startswith("drift_")]
    result = {
        "side": side, "seconds": min(seconds), "peak_mib": max(peak, 0.0),
        "false_positive_rate": sum(null) / max(len(null), 1),
        "detection_rate": sum(drift) / max(len(drift), 1),
        "windows": [len(null), len(drift)],
    }
    with open(out_path, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 1)
