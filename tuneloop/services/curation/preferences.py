"""Corrections and side-by-side verdicts as preferences: a dataset's preference pairs. Pure.

Every correction of a served answer says two things: what the answer should have been
(an SFT target, :mod:`~tuneloop.services.curation.core`) and that it is better than what
was served. The second is a preference pair (chosen: the correction; rejected: the
served answer), kept with each dataset version for DPO (``training.objective``). So is
every side-by-side verdict a rater gave on an answer and the candidate's unseen answer to
the same request (chosen: the answer preferred).

Pairs are scrubbed of PII like examples (a ``json`` pair's sides after it, both in the
canonical form of :func:`~tuneloop.services.curation.core.canonical_object`), then pass
curation's own gates (:mod:`~tuneloop.services.curation.core`), each counted under its
reason: the served answer is empty; the correction is the served answer by the task's
kind (the same label, the same object); the correction is not a target the task accepts
(a ``json`` one its schema refuses); empty content, too short or too long; the prompt is
golden (exact or near); a newer pair has the same prompt, or a near-duplicate one; the
user's ``per_user_cap`` is reached.

A pair takes the split of a curated example with the same prompt (exact or near), a held
out one first, so a prompt the offline gate tests with is never a DPO training pair; a
pair with none (a side-by-side verdict) is split by a hash of its content, so it keeps
its split across versions.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tuneloop.runtime.settings import CurationSettings, TaskSpec
from tuneloop.services.curation.core import (
    EMPTY,
    NEAR_DUPLICATE,
    TOO_LONG,
    TOO_SHORT,
    USER_CAP,
    Candidate,
    Example,
    GoldenIndex,
    canonical_object,
    canonical_target,
    cap_by,
    content_reason,
    leaks_golden,
    near_duplicates,
    prompt_key,
    scrub_turns,
)
from tuneloop.services.evaluation.metrics import normalize_label, normalize_text
from tuneloop.services.evaluation.tasks import parse_object
from tuneloop.services.feedback.redaction import redact

SAME_ANSWER = "chosen answer equals the rejected one"
NOTHING_SERVED = "no rejected answer"
BAD_CORRECTION = "chosen answer not a target the task accepts"
GOLDEN = "golden prompt (exact or near)"
OLDER = "a newer pair has the prompt"
REASONS = (SAME_ANSWER, NOTHING_SERVED, BAD_CORRECTION, EMPTY, TOO_SHORT, TOO_LONG, GOLDEN,
           OLDER, NEAR_DUPLICATE, USER_CAP)
HELD_OUT_FIRST = ("test", "validation", "train")  # a pair near examples of two splits
SOURCES = ("correction", "side-by-side")


@dataclass(frozen=True)
class PreferencePair:
    """One preference: for the chat ``messages`` (without an answer), ``chosen`` is better
    than ``rejected``."""

    pair_id: str
    source_event_id: str | None
    messages: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str = "correction"
    split: str = "train"

    def to_row(self) -> dict[str, Any]:
        return {"pair_id": self.pair_id, "split": self.split,
                "source_event_id": self.source_event_id, "source": self.source,
                "messages": json.dumps(self.messages, ensure_ascii=False),
                "chosen": self.chosen, "rejected": self.rejected}


def pair_id(messages: Sequence[dict[str, str]], chosen: str, rejected: str) -> str:
    blob = json.dumps([list(messages), chosen, rejected], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class PreferenceResult:
    pairs: list[PreferencePair]
    dropped: Counter[str] = field(default_factory=Counter)

    def report(self) -> dict[str, Any]:
        return {"kept": len(self.pairs),
                "dropped": {reason: self.dropped.get(reason, 0) for reason in REASONS},
                "splits": {s: sum(1 for p in self.pairs if p.split == s)
                           for s in ("train", "validation", "test")}}


def correction_pairs(candidates: Sequence[Candidate], golden: GoldenIndex,
                     cfg: CurationSettings, task: TaskSpec | None = None, *,
                     vectors: np.ndarray | None = None, examples: Sequence[Example] = (),
                     example_vectors: np.ndarray | None = None) -> PreferenceResult:
    """The preference pair of each corrected answer in ``candidates`` (see the module).

    ``vectors``: the candidates' prompt unit embeddings, one row each; without them no
    prompt is found near a golden one, a newer pair's or an example's. ``examples``: the
    version's curated examples, split, with their prompts' ``example_vectors``; a pair
    takes the split of one with its prompt.

    Raises ``ValueError`` if ``vectors`` does not have one row per candidate, or
    ``example_vectors`` one per example.
    """
    task = task or TaskSpec()
    if vectors is not None and len(vectors) != len(candidates):
        raise ValueError(f"{len(vectors)} vectors for {len(candidates)} candidates: one per row")
    if example_vectors is not None and len(example_vectors) != len(examples):
        raise ValueError(f"{len(example_vectors)} example_vectors for {len(examples)} "
                         "examples: one per row")
    near_golden = (leaks_golden(vectors, golden, cfg.near_duplicate_cosine) if vectors is not None
                   else np.zeros(len(candidates), dtype=bool))
    result = PreferenceResult([])
    seen: set[str] = set()
    kept: list[tuple[int, PreferencePair, str | None]] = []  # candidate, pair, user
    for i in sorted(range(len(candidates)), key=lambda i: candidates[i].occurred_at,
                    reverse=True):
        cand = candidates[i]
        made = _pair(cand, task, cfg)
        if made is None:
            continue
        reason, pair = made
        key = prompt_key(redact(cand.prompt).text)  # as curation keys the example's prompt
        if reason is None and (key in golden.keys or cand.event_id in golden.event_ids or
                               near_golden[i]):
            reason = GOLDEN
        if reason is None and key in seen:
            reason = OLDER
        if reason is not None:
            result.dropped[reason] += 1
            continue
        seen.add(key)
        kept.append((i, pair, cand.user_id))
    if vectors is not None and kept:
        near = near_duplicates(vectors[[i for i, _, _ in kept]], cfg.near_duplicate_cosine)
        result.dropped[NEAR_DUPLICATE] += int(near.sum())
        kept = [k for k, dup in zip(kept, near, strict=True) if not dup]
    kept = cap_by(kept, lambda k: k[2], cfg.per_user_cap, USER_CAP, result.dropped)
    exact: dict[str, set[str]] = defaultdict(set)
    for example in examples:
        exact[prompt_key(example.prompt)].add(example.split)
    near_splits = [set[str]() for _ in kept]
    if vectors is not None and example_vectors is not None:
        near_splits = _splits_near(vectors[[i for i, _, _ in kept]], examples, example_vectors,
                                   cfg.near_duplicate_cosine)
    for (i, pair, _), close in zip(kept, near_splits, strict=True):
        splits = close | exact.get(prompt_key(redact(candidates[i].prompt).text), set())
        held = next((s for s in HELD_OUT_FIRST if s in splits), None)
        result.pairs.append(replace(pair, split=held) if held else pair)
    return result


def _splits_near(rows: np.ndarray, examples: Sequence[Example], example_vectors: np.ndarray,
                 threshold: float, block: int = 1024) -> list[set[str]]:
    """For each of ``rows``, the splits with an example within ``threshold`` cosine of it;
    ``block`` rows at a time, so memory stays at ``block x len(examples)``."""
    out = [set[str]() for _ in range(len(rows))]
    for name in HELD_OUT_FIRST:
        theirs = example_vectors[np.array([e.split == name for e in examples], dtype=bool)]
        if not len(theirs):
            continue
        for start in range(0, len(rows), block):
            hits = (rows[start : start + block] @ theirs.T >= threshold).any(axis=1)
            for j in np.flatnonzero(hits).tolist():
                out[start + j].add(name)
    return out


def _pair(cand: Candidate, task: TaskSpec, cfg: CurationSettings
          ) -> tuple[str | None, PreferencePair] | None:
    """The candidate's pair, scrubbed, with the first content gate it fails (None: none),
    or None when it has no correction or verdict to make one."""
    if cand.preference:
        chosen = str(cand.preference.get("chosen") or "").strip()
        rejected = str(cand.preference.get("rejected") or "").strip()
        source = "side-by-side"
    else:
        chosen, rejected = (cand.correction or "").strip(), cand.completion.strip()
        source = "correction"
    if not chosen:
        return None
    turns = [dict(m) for m in cand.messages]
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    if task.system_prompt and not any(m["role"] == "system" for m in turns):
        turns.insert(0, {"role": "system", "content": task.system_prompt})
    # Scrubbed as curation scrubs a chat, each side as its last turn: then compared and
    # checked, so a redaction that breaks a json target or makes both sides one is seen.
    scrubbed, _ = scrub_turns([*turns, {"role": "assistant", "content": chosen},
                               {"role": "assistant", "content": rejected}])
    turns = scrubbed[:-2]
    chosen, rejected = scrubbed[-2]["content"], scrubbed[-1]["content"]
    if task.kind == "json":  # both sides in one form, so DPO cannot learn a layout
        chosen = canonical_target(chosen, task) or chosen
        rejected = canonical_object(rejected) or rejected
    pid = pair_id(turns, chosen, rejected)
    pair = PreferencePair(pid, cand.event_id, turns, chosen, rejected, source,
                          split_of(pid, cfg))
    prompt = redact(cand.prompt).text
    reason = _problem(chosen, rejected, task)
    for side in (chosen, rejected):
        reason = reason or content_reason(_as_example(pair, side, prompt), cfg)
    return reason, pair


def _problem(chosen: str, rejected: str, task: TaskSpec) -> str | None:
    if not rejected:
        return NOTHING_SERVED
    if _same_answer(chosen, rejected, task):
        return SAME_ANSWER
    if task.kind == "json" and canonical_target(chosen, task) is None:
        return BAD_CORRECTION
    return None


def _same_answer(chosen: str, rejected: str, task: TaskSpec) -> bool:
    """The two sides say the same by the task's kind: the same label (as the metrics read
    one), the same object (key order and layout aside), the same text (case and spacing
    aside)."""
    if task.kind == "label":
        return normalize_label(chosen) == normalize_label(rejected)
    if task.kind == "json" and (obj := parse_object(chosen)) is not None:
        return obj == parse_object(rejected)
    return normalize_text(chosen) == normalize_text(rejected)


def _as_example(pair: PreferencePair, answer: str, prompt: str) -> Example:
    """One side of a pair as curation's content gates see an example."""
    messages = [*pair.messages, {"role": "assistant", "content": answer}]
    return Example(pair.pair_id, pair.source_event_id, None, messages, prompt, answer)


def split_of(pid: str, cfg: CurationSettings) -> str:
    """A pair's split from its id: the same pair lands in the same split in every version."""
    _, validation, test = cfg.split
    u = int(pid[:8], 16) / 2**32
    return "test" if u < test else "validation" if u < test + validation else "train"


def carried_pairs(unlearned: Sequence[PreferencePair], carried: Sequence[Example],
                  fresh: Sequence[PreferencePair]) -> list[PreferencePair]:
    """The preference pairs of ``carried`` examples (see ``carry_over``), each in its
    example's split; a prompt the fresh pairs or an earlier carried pair has is left out."""
    split_of = {e.source_event_id: e.split for e in carried if e.source_event_id}
    seen = {prompt_key(_prompt(p)) for p in fresh}
    out: list[PreferencePair] = []
    for pair in unlearned:
        key = prompt_key(_prompt(pair))
        if pair.source_event_id not in split_of or key in seen:
            continue
        seen.add(key)
        out.append(replace(pair, split=split_of[pair.source_event_id]))
    return out


def _prompt(pair: PreferencePair) -> str:
    """The last user turn of a pair's chat."""
    return next((m["content"] for m in reversed(pair.messages) if m.get("role") == "user"), "")
