"""``tuneloop bench embed``: tuneloop's ``Embedder`` on each backend against one plain
``SentenceTransformer.encode(texts, batch_size=...)`` call over the whole list.

Speed: every side encodes the same banking77 queries, normalised, with the configured
batch size (32, the library's default; 64 and 128 measured no faster for the library).
Models are loaded, exported and warmed up before any clock starts. Two rounds, the
order reversed in the second; each side's median is kept.

Sides: the plain library call; ``Embedder`` with ``embeddings.backend`` ``torch`` (which
hands the library the whole request), ``onnx`` (the same transformer run by
onnxruntime) and ``onnx-int8`` (its weights quantized to int8).

What the embeddings are for decides whether a faster backend counts. On every banking77
query each backend's vectors are compared with the library's: cosine agreement; the
drift decision (``detect_drift``) on the drift benchmark's windows
(``tuneloop/bench/drift.py``: 2% to 100% unseen intents, and the two no-drift kinds); the
near-duplicate sets curation keeps (``curation.near_duplicate_cosine``) on each current
window, and the distinct rows drift reduces each window to
(``tuneloop.services.drift.core.DUPLICATE_COSINE``). ``FIGURE embed_ratio`` is the
fastest backend whose decisions and sets all match the library's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from tuneloop.bench.drift import make_windows
from tuneloop.runtime.settings import Settings
from tuneloop.services.curation.core import near_duplicates
from tuneloop.services.demo import banking77
from tuneloop.services.drift.core import detect_drift, distinct
from tuneloop.services.drift.embeddings import Embedder

ROUNDS = 2
BACKENDS = ("torch", "onnx", "onnx-int8")


def _agreement(settings: Settings, embedders: dict[str, Embedder], windows: int
               ) -> dict[str, dict[str, float]]:
    """Each backend against the library's vectors, on every banking77 query and window."""
    queries = [(q, split) for split in ("train", "test") for q in banking77.load(split)]
    texts = [q.text for q, _ in queries]
    plain = np.asarray(embedders["torch"].model.encode(
        texts, batch_size=settings.embeddings.batch_size, normalize_embeddings=True,
        convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)
    index = make_windows([(q.intent, split) for q, split in queries], windows)
    names = sorted(k.removesuffix("_ref") for k in index if k.endswith("_ref"))
    cosine_threshold = settings.curation.near_duplicate_cosine

    def outcomes(vectors: np.ndarray) -> tuple[list[bool], list[frozenset[int]], list[int]]:
        decisions, near, kept = [], [], []
        for name in names:
            ref, cur = vectors[index[f"{name}_ref"]], vectors[index[f"{name}_cur"]]
            decisions.append(detect_drift(ref, cur, settings.drift).drifted)
            near.append(frozenset(np.flatnonzero(near_duplicates(cur, cosine_threshold)).tolist()))
            kept.append(len(distinct(cur)[0]))
        return decisions, near, kept

    base = outcomes(plain)
    out: dict[str, dict[str, float]] = {}
    for backend, embedder in embedders.items():
        vectors = embedder.encode(texts)
        cosine = np.sum(vectors * plain, axis=1)
        decisions, near, kept = outcomes(vectors)
        out[backend] = {
            "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "decisions_differ": sum(a != b for a, b in zip(decisions, base[0], strict=True)),
            "near_sets_differ": sum(a != b for a, b in zip(near, base[1], strict=True)),
            "near_rows_differ": sum(len(a ^ b) for a, b in zip(near, base[1], strict=True)),
            "distinct_differ": sum(a != b for a, b in zip(kept, base[2], strict=True)),
            "windows": len(names), "drifted": sum(decisions), "texts": len(texts),
        }
    return out


def main(settings: Settings, quick: bool = False) -> None:
    texts = [q.text for q in banking77.load("train")][: 1000 if quick else 4000]
    batch = settings.embeddings.batch_size
    embedders = {b: Embedder(settings.embeddings.model_copy(update={"backend": b}))
                 for b in BACKENDS}
    model = embedders["torch"].model
    for embedder in embedders.values():  # load, export and warm up outside every clock
        embedder.encode(texts[:256])
    model.encode(texts[:256], batch_size=batch)

    def plain() -> np.ndarray:
        return np.asarray(model.encode(texts, batch_size=batch, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False))

    sides: dict[str, Callable[[], np.ndarray]] = {"plain": plain}
    for backend, embedder in embedders.items():
        sides[backend] = (lambda e: lambda: e.encode(texts))(embedder)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(ROUNDS):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            started = time.perf_counter()
            sides[name]()
            seconds[name].append(time.perf_counter() - started)
    rate = {name: len(texts) / statistics.median(s) for name, s in seconds.items()}
    agree = _agreement(settings, embedders, 3 if quick else 10)

    print(f"embedding {len(texts):,} banking77 queries with {settings.embeddings.model}, "
          f"batch {batch}, {ROUNDS} rounds with the order reversed, median")
    print("| side | texts/s | x plain | seconds per round | cosine mean (min) | drift decisions "
          "differing | near-duplicate sets differing (rows) | distinct-row counts differing |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| one SentenceTransformer.encode call | {rate['plain']:.0f} | 1.00 | "
          f"{', '.join(f'{s:.2f}' for s in seconds['plain'])} | 1 | - | - | - |")
    counted = []
    for backend in BACKENDS:
        a = agree[backend]
        same = not (a["decisions_differ"] or a["near_sets_differ"] or a["distinct_differ"])
        if same:
            counted.append(backend)
        print(f"| Embedder, backend {backend} | {rate[backend]:.0f} | "
              f"{rate[backend] / rate['plain']:.2f} | "
              f"{', '.join(f'{s:.2f}' for s in seconds[backend])} | "
              f"{a['cosine_mean']:.4f} ({a['cosine_min']:.4f}) | "
              f"{a['decisions_differ']:.0f} of {a['windows']:.0f} | "
              f"{a['near_sets_differ']:.0f} of {a['windows']:.0f} ({a['near_rows_differ']:.0f}) | "
              f"{a['distinct_differ']:.0f} of {a['windows']:.0f} |")
    windows = agree["torch"]
    print(f"agreement on all {windows['texts']:.0f} banking77 queries and {windows['windows']:.0f} "
          f"drift windows ({windows['drifted']:.0f} drifted with the library's vectors)")
    best = max(counted, key=lambda b: rate[b])
    print(f"fastest backend with the same decisions and sets: {best}")
    print(f"FIGURE embed_ratio={rate[best] / rate['plain']:.2f}")
    for backend in BACKENDS:
        tag = backend.replace("-", "_")
        print(f"FIGURE embed_{tag}_ratio={rate[backend] / rate['plain']:.2f}")
