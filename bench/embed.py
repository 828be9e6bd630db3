"""``tuneloop bench embed``: tuneloop's ``Embedder`` against one plain
``SentenceTransformer.encode(texts, batch_size=...)`` call over the whole list.

Both sides encode the same banking77 queries with the same model object (loaded and
warmed up once, outside the clock), normalised, with the configured batch size. The
``Embedder`` once sorted the whole request itself and called the library batch by
batch; it measured no faster than the library's own length-sorted batching, so it now
hands the library the whole request (slices of 16 batches only when it reports
progress). The order is alternated over rounds and each side's median is kept. The
vectors must agree (cosine) for the comparison to count.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from services import banking77
from services.embeddings import Embedder
from services.settings import Settings

ROUNDS = 2


def main(settings: Settings, quick: bool = False) -> None:
    texts = [q.text for q in banking77.load("train")][: 1000 if quick else 4000]
    embedder = Embedder(settings.embeddings)
    model, batch = embedder.model, settings.embeddings.batch_size
    model.encode(texts[:256], batch_size=batch)  # warm-up for both

    def plain() -> np.ndarray:
        return np.asarray(model.encode(texts, batch_size=batch, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False))

    def ours() -> np.ndarray:
        return embedder.encode(texts)

    seconds: dict[str, list[float]] = {"tuneloop": [], "plain": []}
    vectors: dict[str, np.ndarray] = {}
    for r in range(ROUNDS):
        order = (("tuneloop", ours), ("plain", plain))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            vectors[name] = fn()
            seconds[name].append(time.perf_counter() - started)
    cosine = np.sum(vectors["tuneloop"] * vectors["plain"], axis=1)
    rate = {name: len(texts) / statistics.median(s) for name, s in seconds.items()}
    print(f"embedding {len(texts):,} banking77 queries with {embedder.name}, batch {batch}, "
          f"{ROUNDS} alternated rounds, median")
    print("| side | texts/s | seconds per round |")
    print("| --- | --- | --- |")
    print(f"| tuneloop Embedder.encode | {rate['tuneloop']:.0f} | "
          f"{', '.join(f'{s:.2f}' for s in seconds['tuneloop'])} |")
    print(f"| one SentenceTransformer.encode call | {rate['plain']:.0f} | "
          f"{', '.join(f'{s:.2f}' for s in seconds['plain'])} |")
    print(f"cosine agreement: mean {cosine.mean():.4f}, min {cosine.min():.4f}")
    print(f"FIGURE embed_ratio={rate['tuneloop'] / rate['plain']:.2f}")
