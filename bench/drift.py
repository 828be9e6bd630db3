"""``tuneloop bench drift``: tuneloop's drift check against Evidently's, in one run.

Both sides get the same banking77 MiniLM embeddings: a 5,000-event reference
from all but ten intents, and 5,000-event current windows, either from the same
intents (false-positive rate) or with 20% of traffic from the ten unseen intents
(detection rate). Wall time and peak memory are of one full check on 5,000 vs
5,000, each side in its own process (Evidently in ``.venv-bench``, created here,
because its pins conflict with the main environment).

Embedding throughput compares tuneloop's :class:`Embedder` with a plain loop of
``SentenceTransformer.encode`` over the same uncached texts.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from services import banking77
from services.embeddings import Embedder, embed_texts
from services.settings import Settings
from services.store import Store

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BENCH_VENV = REPO / ".venv-bench"
EVIDENTLY = ("evidently==0.7.23", "pandas<3")
N, NOVEL_SHARE, UNSEEN_INTENTS = 5000, 0.2, 10


def ensure_bench_venv() -> Path:
    """The benchmark-only virtualenv with Evidently (created on first use)."""
    python = BENCH_VENV / "bin" / "python"
    if python.exists() and subprocess.run(
        [str(python), "-c", "import evidently"], capture_output=True
    ).returncode == 0:
        return python
    log.info("creating %s with %s (first run only)", BENCH_VENV, " ".join(EVIDENTLY))
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *EVIDENTLY], check=True)
    return python


def _windows(vectors: dict[str, np.ndarray], windows: int, seed: int = 0) -> dict[str, np.ndarray]:
    queries = banking77.load("train") + banking77.load("test")
    intents = sorted({q.intent for q in queries})
    unseen_intents = set(random.Random(seed).sample(intents, UNSEEN_INTENTS))
    seen = [q.text for q in banking77.select(queries, [i for i in intents if i not in unseen_intents])]
    unseen = [q.text for q in banking77.select(queries, sorted(unseen_intents))]
    ref, rest = seen[:N], seen[N:]

    def stack(texts: list[str]) -> np.ndarray:
        return np.stack([vectors[t] for t in texts])

    out = {"ref": stack(ref), "timed": stack(random.Random(seed + 1).sample(rest, N))}
    n_novel = int(N * NOVEL_SHARE)
    for w in range(windows):
        rng = random.Random(1000 + w)
        out[f"null_{w:02d}"] = stack(rng.sample(rest, N))
        drift = rng.sample(rest, N - n_novel) + rng.choices(unseen, k=n_novel)
        out[f"drift_{w:02d}"] = stack(drift)
    return out


def _run_side(python: Path, side: str, data: Path, workdir: Path) -> dict[str, Any]:
    out = workdir / f"{side}.json"
    subprocess.run(
        [str(python), str(REPO / "bench" / "_drift_worker.py"), side, str(data), str(out)],
        check=True, cwd=REPO, env=_env(),
    )
    return dict(json.loads(out.read_text()))


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def embed_throughput(settings: Settings, n: int) -> tuple[float, float]:
    """Texts per second: tuneloop's Embedder and a plain ``encode`` loop, same texts."""
    texts = [q.text for q in banking77.load("train")][:n]
    embedder = Embedder(settings.embeddings)
    model = embedder.model
    model.encode(texts[:64])  # warm-up for both
    batch = settings.embeddings.batch_size
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        model.encode(texts[i : i + batch], batch_size=batch, normalize_embeddings=True)
    plain = len(texts) / (time.perf_counter() - started)
    started = time.perf_counter()
    embedder.encode(texts)
    ours = len(texts) / (time.perf_counter() - started)
    return ours, plain


def main(settings: Settings, quick: bool = False) -> None:
    windows = 5 if quick else 20
    python = ensure_bench_venv()
    store = Store(settings.home / "bench" / "drift.duckdb", settings.store.lock_timeout_s)
    queries = banking77.load("train") + banking77.load("test")
    texts = list(dict.fromkeys(q.text for q in queries))
    matrix, stats = embed_texts(store, Embedder(settings.embeddings), texts)
    log.info("bench embeddings: %d texts, %d from cache", stats.texts, stats.hits)
    vectors = dict(zip(texts, matrix, strict=True))
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-drift-") as tmp:
        work = Path(tmp)
        data = work / "windows.npz"
        np.savez(data, **_windows(vectors, windows))  # type: ignore[arg-type]
        ours = _run_side(Path(sys.executable), "tuneloop", data, work)
        theirs = _run_side(python, "evidently", data, work)
    ours_tps, plain_tps = embed_throughput(settings, 1000 if quick else 4000)
    speedup = theirs["seconds"] / ours["seconds"]
    rows = [
        ("tuneloop (MMD + classifier + cluster report)", ours),
        ("Evidently 0.7.23 EmbeddingsDrift (default: classifier, AUC > 0.55)", theirs),
    ]
    print(f"drift check, {N:,} vs {N:,} banking77 MiniLM embeddings, {windows} windows each way")
    print("| side | wall s | peak MiB | detection | false positives |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | "
              f"{r['detection_rate']:.2f} | {r['false_positive_rate']:.2f} |")
    print(f"embedding throughput: tuneloop {ours_tps:.0f} texts/s, plain encode loop "
          f"{plain_tps:.0f} texts/s")
    print(f"FIGURE drift_speedup={speedup:.2f}")
    print(f"FIGURE drift_detection_rate={ours['detection_rate']:.3f}")
    print(f"FIGURE drift_false_positive_rate={ours['false_positive_rate']:.3f}")
    print(f"FIGURE evidently_detection_rate={theirs['detection_rate']:.3f}")
    print(f"FIGURE embed_ratio={ours_tps / plain_tps:.2f}")
