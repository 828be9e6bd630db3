"""``tuneloop bench drift``: the drift decision's power curve, calibration and speed,
against Evidently's default embedding drift and a full MMD permutation test, in one run.

Every window pairs a reference of ``N`` banking77 queries with a current window of ``N``
(the same sizes on both sides, and the same windows for every method; nothing is
subsampled). Each window draws its own ``UNSEEN`` intents that the reference never has:

* power: ``N`` current events of which a share (2% .. 100%) come from those intents;
* false positives: current windows of the reference's intents from the same split
  (``same``), and from banking77's other split (``style``: another collection batch).

Methods, each with its own default decision:

* tuneloop's ``detect_drift`` (novel share significant and at least
  ``drift.min_novel_share``);
* Evidently 0.7's ``EmbeddingsDrift`` default (a domain classifier, ROC AUC above 0.55),
  in a virtualenv of its own in the user's cache (``~/.cache/tuneloop/bench/``, created on
  first use: its pins conflict with the main environment);
* the MMD permutation test (p below ``drift.alpha``), as the statistical reference: the
  one tuneloop runs inside each check.

The score's calibration is its mean at each share against the share itself. Time per
check: the same windows through each side, the order alternated over two rounds. The
plot goes to ``<home>/reports/drift-power.png`` unless ``plot_path`` names another file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import tuneloop
from tuneloop.runtime.cache import user_cache_dir
from tuneloop.runtime.settings import Settings
from tuneloop.services.demo import banking77
from tuneloop.services.drift.embeddings import Embedder, embed_texts
from tuneloop.services.store.database import Store

log = logging.getLogger(__name__)

# The folder holding the tuneloop package (a checkout or site-packages): the workers'
# PYTHONPATH and working directory, so they import this very tuneloop.
PACKAGE_ROOT = Path(tuneloop.__file__).resolve().parents[1]
EVIDENTLY = ("evidently==0.7.23", "pandas<3")
N, UNSEEN = 1000, 10
SHARES = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
NULLS = ("same", "style")


def bench_venv() -> Path:
    """Where the Evidently virtualenv lives: the user's cache, one per Python version (the
    venv runs on the interpreter that created it)."""
    return user_cache_dir("bench") / f"venv-drift-py{sys.version_info.major}.{sys.version_info.minor}"


def ensure_bench_venv() -> Path:
    """The benchmark-only virtualenv with Evidently (created on first use); its python."""
    venv = bench_venv()
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run(
        [str(python), "-c", "import evidently"], capture_output=True
    ).returncode == 0:
        return python
    log.info("creating %s with %s (first run only)", venv, " ".join(EVIDENTLY))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *EVIDENTLY], check=True)
    return python


def make_windows(rows: list[tuple[str, str]], windows: int, seed: int = 0
                 ) -> dict[str, np.ndarray]:
    """Indices into ``rows`` (intent, split) for every window: ``<kind>_<w>_ref`` / ``_cur``."""
    intents = sorted({intent for intent, _ in rows})
    out: dict[str, np.ndarray] = {}
    for w in range(windows):
        rng = random.Random(seed * 100_000 + w)
        unseen = set(rng.sample(intents, UNSEEN))
        seen_train = [i for i, (intent, split) in enumerate(rows)
                      if intent not in unseen and split == "train"]
        seen_test = [i for i, (intent, split) in enumerate(rows)
                     if intent not in unseen and split == "test"]
        novel = [i for i, (intent, _) in enumerate(rows) if intent in unseen]
        rng.shuffle(seen_train)
        ref, rest = seen_train[:N], seen_train[N:]
        for share in SHARES:
            k = round(share * N)
            cur = rng.sample(rest, N - k) + rng.sample(novel, k)
            out[f"p{share}_{w}_ref"], out[f"p{share}_{w}_cur"] = np.array(ref), np.array(cur)
        out[f"same_{w}_ref"], out[f"same_{w}_cur"] = np.array(ref), np.array(rng.sample(rest, N))
        out[f"style_{w}_ref"] = np.array(ref)
        out[f"style_{w}_cur"] = np.array(rng.sample(seen_test, N))
    return out


def _run_side(python: Path, side: str, data: Path, out: Path, phase: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_ROOT), HF_HUB_OFFLINE="1")
    subprocess.run([str(python), "-m", "tuneloop.bench._drift_worker", side, phase,
                    str(data), str(out)], check=True, cwd=PACKAGE_ROOT, env=env)
    return dict(json.loads(out.read_text()))


def _rate(results: dict[str, Any], kind: str, key: str = "drifted") -> float:
    rows = [r[key] for name, r in results.items() if name.startswith(f"{kind}_")]
    return float(np.mean(rows)) if rows else float("nan")


def plot(curves: dict[str, list[float]], calibration: list[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (power, calib) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for (name, rates), style in zip(curves.items(), ("o-", "s--", "^:"), strict=False):
        power.plot(SHARES, rates, style, label=name)
    power.set_xscale("log")
    power.set_xticks(SHARES, [f"{s:.0%}" for s in SHARES])
    power.set_xlabel("share of the current window from unseen intents")
    power.set_ylabel("detection rate")
    power.set_ylim(-0.02, 1.02)
    power.legend(loc="lower right", fontsize=8)
    power.grid(alpha=0.3)
    calib.plot([0, 1], [0, 1], color="#999999", linestyle=":", label="ideal")
    calib.plot(SHARES, calibration, "o-", color="#4477aa", label="tuneloop novel share")
    calib.set_xlabel("true novel share")
    calib.set_ylabel("mean score")
    calib.legend(loc="upper left", fontsize=8)
    calib.grid(alpha=0.3)
    fig.suptitle(f"drift on banking77: {N:,} vs {N:,} events, {UNSEEN} unseen intents "
                 "per window")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(settings: Settings, quick: bool = False, plot_path: Path | None = None) -> None:
    """Run every method on the same windows and print the table and FIGURE lines; the plot
    goes to ``plot_path``, by default ``<home>/reports/drift-power.png``."""
    windows = 8 if quick else 50
    python = ensure_bench_venv()
    store = Store(settings.home / "bench" / "drift.duckdb", settings.store.lock_timeout_s)
    queries = [(q, split) for split in ("train", "test") for q in banking77.load(split)]
    matrix, stats = embed_texts(store, Embedder(settings.embeddings),
                                [q.text for q, _ in queries])
    log.info("bench embeddings: %d texts, %d from cache", stats.texts, stats.hits)
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-drift-") as tmp:
        work = Path(tmp)
        data = work / "windows.npz"
        np.savez(data, vectors=matrix.astype(np.float32),
                 **make_windows([(q.intent, split) for q, split in queries],
                                windows))  # type: ignore[arg-type]
        sides = {"tuneloop": Path(sys.executable), "evidently": python}
        decisions = {side: _run_side(py, side, data, work / f"{side}.json", "decide")
                     for side, py in sides.items()}
        # Time per check: the same windows, each side first in one round.
        seconds: dict[str, list[float]] = {side: [] for side in sides}
        for order in (("tuneloop", "evidently"), ("evidently", "tuneloop")):
            for side in order:
                timed = _run_side(sides[side], side, data, work / f"{side}-t.json", "time")
                seconds[side].append(timed["seconds_per_check"])
    ours, theirs = decisions["tuneloop"], decisions["evidently"]
    curves = {
        "tuneloop (novel share)": [_rate(ours, f"p{s}") for s in SHARES],
        "Evidently default (classifier)": [_rate(theirs, f"p{s}") for s in SHARES],
        "MMD permutation test": [_rate(ours, f"p{s}", "mmd_drifted") for s in SHARES],
    }
    calibration = [_rate(ours, f"p{s}", "score") for s in SHARES]
    calib_error = float(np.mean([abs(m - s) for m, s in zip(calibration, SHARES, strict=True)
                                 if s >= 0.1]))
    fpr = {kind: (_rate(ours, kind), _rate(theirs, kind), _rate(ours, kind, "mmd_drifted"))
           for kind in NULLS}
    our_s, their_s = float(np.median(seconds["tuneloop"])), float(np.median(seconds["evidently"]))
    png = plot(curves, calibration, plot_path or settings.home / "reports" / "drift-power.png")

    print(f"drift on banking77 MiniLM embeddings: {N:,} vs {N:,} events, {UNSEEN} unseen "
          f"intents drawn per window, {windows} windows per point")
    print("| current window | tuneloop | Evidently default | MMD test | tuneloop mean score |")
    print("| --- | --- | --- | --- | --- |")
    for s, mean in zip(SHARES, calibration, strict=True):
        print(f"| {s:.0%} unseen intents | {_rate(ours, f'p{s}'):.2f} | "
              f"{_rate(theirs, f'p{s}'):.2f} | {_rate(ours, f'p{s}', 'mmd_drifted'):.2f} | "
              f"{mean:.3f} |")
    for kind, label in (("same", "same intents, same split"),
                        ("style", "same intents, other split")):
        ours_r, theirs_r, mmd_r = fpr[kind]
        print(f"| {label} (false positives) | {ours_r:.2f} | {theirs_r:.2f} | {mmd_r:.2f} | "
              f"{_rate(ours, kind, 'score'):.3f} |")
    print(f"time per check (median of 2 alternated rounds): tuneloop {our_s:.3f} s, "
          f"Evidently {their_s:.3f} s; rounds {seconds}")
    print(f"plot: {png}")
    print(f"FIGURE drift_detection_at_5pct={_rate(ours, 'p0.05'):.3f}")
    print(f"FIGURE evidently_detection_at_5pct={_rate(theirs, 'p0.05'):.3f}")
    print(f"FIGURE drift_false_positive_rate={max(fpr['same'][0], fpr['style'][0]):.3f}")
    print(f"FIGURE drift_score_calibration_error={calib_error:.3f}")
    print(f"FIGURE drift_speedup={their_s / our_s:.2f}")
