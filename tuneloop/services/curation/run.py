"""Curation's entry point: feedback in DuckDB -> one new immutable dataset version.

:func:`run_curation` is what the ``curate`` and ``retrain`` flows, the CLI and the tests
call. A run considers feedback ingested since the latest version was curated (so each
version adds new data), embeds the prompts (cached), curates against the golden set
(:mod:`~tuneloop.services.curation.core`), splits, carries over for a retrain what
production never learned, mixes in ``replay_share`` of the parent version's train split
(production's for a retrain, else the latest), and writes the version. The store is held for the reads
and the final write only, never while embedding.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuneloop.runtime.settings import CurationSettings, TaskSpec
from tuneloop.services.curation import golden
from tuneloop.services.curation.core import (
    CurationResult,
    Example,
    GoldenIndex,
    NothingNew,
    cap_known_labels,
    carry_over,
    curate,
    leaks_golden,
    prompt_key,
    replay,
    split,
)
from tuneloop.services.curation.preferences import (
    PreferenceResult,
    carried_pairs,
    correction_pairs,
)
from tuneloop.services.curation.store import (
    CurationInputs,
    CurationRun,
    Learned,
    read_inputs,
    write_version,
)
from tuneloop.services.drift.embeddings import Embedder, EmbedStats, Progress, embed_texts
from tuneloop.services.store.database import AnyStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Curated:
    """What the pure steps made of one run's inputs."""

    result: CurationResult
    examples: list[Example]  # fresh examples, split
    replayed: list[Example]  # from the parent version's train split
    carried: list[Example]  # from versions production never learned (in ``examples``)
    capped: int  # train examples (fresh or carried) left out by ``known_label_train_cap``
    preferences: PreferenceResult  # the corrections' preference pairs, carried ones too


def run_curation(
    store: AnyStore, embedder: Embedder, cfg: CurationSettings, progress: Progress | None = None,
    include_used: bool = False, run_key: str | None = None, task: TaskSpec | None = None,
    learned: Learned | None = None,
) -> CurationRun:
    """Curate one new dataset version for ``task`` (the served alias's; default a label
    task).

    ``learned`` names the version the production adapter was trained on, when the new
    version is for a retrain that continues from it: replay then draws from that version,
    its labels are the known ones ``known_label_train_cap`` caps, and the examples of the
    versions curated after it (candidates that never reached production) carry over.

    ``run_key`` (the loop's retrain key) is kept with the version, so a rerun of the same
    retrain finds it (:func:`~tuneloop.services.curation.store.find_curated`) instead of
    curating again. Raises :class:`~tuneloop.services.curation.core.NothingNew` (a
    ``ValueError``) when no fresh example survives curation (carried and replayed examples
    alone make no version), and
    :class:`~tuneloop.services.store.database.StoreBusyError` if the store stays busy.
    """
    with store.connect() as con:
        inputs = read_inputs(con, include_used, learned)
    if not inputs.candidates:  # a quiet hour: nothing to embed or curate
        raise NothingNew(_nothing_new(CurationResult([], 0, Counter(), 0)))
    texts = [c.prompt for c in inputs.candidates] + [g.prompt for g in inputs.golden] + \
        [p.prompt for p in inputs.previous] + [u.prompt for u in inputs.unlearned.examples]
    vectors, stats = embed_texts(store, embedder, texts, progress)
    curated = curate_version(inputs, vectors, cfg, task)
    if not curated.examples:
        raise NothingNew(_nothing_new(curated.result))
    report = _report(curated, len(inputs.golden), stats)
    parents = [inputs.parent] if inputs.parent and curated.replayed else []
    parents += [v for v in _carried_from(curated, inputs) if v not in parents]
    with store.connect() as con:
        version, digest = write_version(con, curated.examples + curated.replayed, parents,
                                        _filters(inputs, cfg, include_used, run_key, task), report,
                                        curated.preferences.pairs)
    log.info("dataset %s: %d considered, %d kept, %d carried from %s, %d replayed from %s, "
             "hash %s", version, curated.result.considered, len(curated.result.examples),
             len(curated.carried), ", ".join(_carried_from(curated, inputs)) or "-",
             len(curated.replayed), inputs.parent, digest[:12])
    return CurationRun(version, digest, parents, report)


def curate_version(inputs: CurationInputs, vectors: np.ndarray,
                   cfg: CurationSettings, task: TaskSpec | None = None) -> Curated:
    """The pure part of a run: ``vectors`` hold the candidates', the golden set's, the
    parent's train prompts and the unlearned versions' prompts, in that order."""
    n_c, n_g, n_p = len(inputs.candidates), len(inputs.golden), len(inputs.previous)
    guard = golden.index(inputs.golden, vectors[n_c : n_c + n_g])
    result = curate(inputs.candidates, vectors[:n_c], guard, cfg, task)
    examples = split(result.examples, cfg)
    carried: list[Example] = []
    if examples and inputs.unlearned.examples:  # nothing new: no retrain on the old alone
        at = {c.event_id: i for i, c in enumerate(inputs.candidates)}
        fresh = [e for e in examples if e.source_event_id is not None and e.source_event_id in at]
        unlearned_vectors = vectors[n_c + n_g + n_p :]
        carried = carry_over(
            inputs.unlearned.examples, unlearned_vectors,
            leaks_golden(unlearned_vectors, guard, cfg.near_duplicate_cosine).tolist(),
            fresh, vectors[[at[str(e.source_event_id)] for e in fresh]], cfg)
    examples = examples + carried
    capped = 0
    previous = inputs.previous
    if cfg.known_label_train_cap is not None and previous:
        examples, capped = cap_known_labels(examples, {p.label for p in previous if p.label},
                                            cfg.known_label_train_cap)
    kept = {id(e) for e in examples}
    carried = [e for e in carried if id(e) in kept]
    # Replay guards what is new against forgetting; with nothing new there is no version.
    replayed = _replay(previous, vectors[n_c + n_g : n_c + n_g + n_p], examples, guard,
                       cfg) if examples else []
    # A pair takes the split of an example with its prompt: DPO never trains on a test one.
    pairs = correction_pairs(inputs.candidates, guard, cfg, task, vectors=vectors[:n_c],
                             examples=examples,
                             example_vectors=_vectors_of(examples, inputs, vectors))
    pairs.pairs.extend(carried_pairs(inputs.unlearned.pairs, carried, pairs.pairs))
    return Curated(result, examples, replayed, carried, capped, pairs)


def _vectors_of(examples: list[Example], inputs: CurationInputs, vectors: np.ndarray
                ) -> np.ndarray:
    """The prompt vector of each of a version's ``examples``: a carried one's own, a fresh
    one's candidate's (``vectors`` in :func:`curate_version`'s order)."""
    first = len(inputs.candidates) + len(inputs.golden) + len(inputs.previous)
    carried = {id(e): first + j for j, e in enumerate(inputs.unlearned.examples)}
    fresh = {c.event_id: i for i, c in enumerate(inputs.candidates)}
    return vectors[[carried[id(e)] if id(e) in carried else fresh[str(e.source_event_id)]
                    for e in examples]]


def _nothing_new(result: CurationResult) -> str:
    """Why a run has no version to write: what it considered and what it dropped."""
    dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(result.dropped.items()) if n)
    return (f"nothing new to learn: {result.considered} feedback event(s) since the last "
            "dataset version, none kept" + (f" (dropped: {dropped})" if dropped else ""))


def _carried_from(curated: Curated, inputs: CurationInputs) -> list[str]:
    """The unlearned versions at least one carried example came from, newest first."""
    carried = {id(e) for e in curated.carried}
    unlearned = inputs.unlearned
    found = {unlearned.versions[i] for i, e in zip(unlearned.index, unlearned.examples,
                                                   strict=True) if id(e) in carried}
    return [v for v in unlearned.versions if v in found]


def _replay(previous: list[Example], previous_vectors: np.ndarray, examples: list[Example],
            guard: GoldenIndex, cfg: CurationSettings) -> list[Example]:
    """The parent's train examples to mix in, none of them near a golden example."""
    clean = ~leaks_golden(previous_vectors, guard, cfg.near_duplicate_cosine)
    return replay(
        [p for p, ok in zip(previous, clean, strict=True) if ok],
        sum(1 for e in examples if e.split == "train"), cfg,
        {prompt_key(e.prompt) for e in examples}, guard,
    )


def _report(curated: Curated, n_golden: int, stats: EmbedStats) -> dict[str, Any]:
    kept = curated.examples + curated.replayed
    return curated.result.report() | {
        "replayed": len(curated.replayed),
        "carried": len(curated.carried),
        "known_label_train_capped": curated.capped,
        "preference_pairs": curated.preferences.report(),
        "golden_guarded": n_golden,
        "embedded": stats.encoded,
        "embedding_cache_hits": stats.hits,
        "splits": {s: sum(1 for e in kept if e.split == s)
                   for s in ("train", "validation", "test")},
    }


def _filters(inputs: CurationInputs, cfg: CurationSettings, include_used: bool,
             run_key: str | None, task: TaskSpec | None) -> dict[str, Any]:
    """What made the version: the settings, and the watermark the next run starts after."""
    return cfg.model_dump(mode="json") | {
        "include_used": include_used,
        "considered_through": inputs.through.isoformat() if inputs.through else None,
        "considered_through_seq": inputs.through_seq,
        "replay_from": inputs.parent,
        "run_key": run_key,
        "task": (task or TaskSpec()).describe(),
    }
