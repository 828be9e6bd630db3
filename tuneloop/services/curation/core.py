"""Curation core: feedback events in, clean training examples out, every drop counted.

Pure functions only; :mod:`tuneloop.services.curation.store` reads the events and writes
the dataset version. Each candidate passes these gates in order and is dropped
at the first it fails, under the reason named by the constant:

1. selection, by the task's kind (:func:`select`): a correction, else the label (when
   ``label_is_answer``; never for ``text``), else an answer the user rated up (for
   ``json`` and ``text``: at least ``target_min_rating``). An answer rated down is never
   trained on as is. A ``json`` target must parse and satisfy the task's schema, and is
   kept in one canonical form; one that does not is left out with the reason.
   The task's system prompt goes first in a chat that has none.
2. PII scrub of every turn (defence in depth: ingest already redacted); an answer that
   is a JSON object in its string values only, and a ``json`` target is checked again
   after it (:data:`INVALID_TARGET` when the scrub made it one the schema refuses).
3. empty content, then length (``min_chars`` .. ``max_chars`` of the prompt).
4. golden leak: the prompt is a golden prompt, or a near-duplicate of one.
5. exact duplicate, then near-duplicate (embedding cosine >= threshold), newest kept.
6. per-user cap, then per-label cap.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar

import numpy as np

from tuneloop.runtime.settings import CurationSettings, TaskSpec
from tuneloop.services.drift.embeddings import content_hash
from tuneloop.services.evaluation.tasks import parse_object, schema_errors
from tuneloop.services.feedback.redaction import redact
from tuneloop.services.ingest.core import redact_answer

NOT_SELECTED = "no correction, label or positive rating"
RATED_DOWN = "rated down, no correction"
RATED_LOW = "rated below the task's target_min_rating, no correction"
INVALID_TARGET = "target not a JSON object its schema accepts"
EMPTY = "empty content"
TOO_SHORT = "too short"
TOO_LONG = "too long"
GOLDEN_EXACT = "golden example (exact)"
GOLDEN_NEAR = "golden example (near-duplicate)"
DUPLICATE = "exact duplicate"
NEAR_DUPLICATE = "near duplicate"
USER_CAP = "per-user cap"
LABEL_CAP = "per-label cap"
DROP_REASONS = (
    NOT_SELECTED, RATED_DOWN, RATED_LOW, INVALID_TARGET, EMPTY, TOO_SHORT, TOO_LONG,
    GOLDEN_EXACT, GOLDEN_NEAR, DUPLICATE, NEAR_DUPLICATE, USER_CAP, LABEL_CAP,
)
SPLITS = ("train", "validation", "test")
INVALID_SHOWN = 20  # invalid json targets a curation report names, with their reasons
NO_LABEL = "<none>"
T = TypeVar("T")


@dataclass(frozen=True)
class Candidate:
    """One feedback event as curation sees it."""

    event_id: str
    occurred_at: datetime
    messages: list[dict[str, str]]
    prompt: str
    completion: str
    rating: float | None = None
    correction: str | None = None
    label: str | None = None
    user_id: str | None = None
    # A side-by-side verdict (the gateway's ``metadata.preference``): chosen and rejected.
    preference: dict[str, Any] | None = None


@dataclass(frozen=True)
class Example:
    """A training example: the chat ending with the assistant turn to learn."""

    example_id: str
    source_event_id: str | None
    label: str | None
    messages: list[dict[str, str]]
    prompt: str
    completion: str
    user_id: str | None = None
    split: str = "train"

    def to_row(self) -> dict[str, Any]:
        return {
            "example_id": self.example_id, "split": self.split,
            "source_event_id": self.source_event_id, "label": self.label,
            "messages": json.dumps(self.messages), "prompt": self.prompt,
            "completion": self.completion,
        }


def example_id(messages: Sequence[dict[str, str]]) -> str:
    """Content identity of an example (the same chat always gets the same id)."""
    return hashlib.sha256(json.dumps(list(messages), sort_keys=True).encode()).hexdigest()[:16]


def prompt_key(text: str) -> str:
    """Exact-duplicate key: case- and whitespace-insensitive content hash."""
    return content_hash(text.casefold())


def select(candidate: Candidate, label_is_answer: bool = True,
           task: TaskSpec | None = None) -> Example | str:
    """The example an event teaches for ``task`` (default: a label task), or the drop
    reason (:data:`INVALID_TARGET` comes with :func:`target_problem`'s detail in the log)."""
    task = task or TaskSpec()
    if task.kind == "text":
        label_is_answer = False  # a label names the reply's topic, it is not a reply
    if task.kind == "json" and candidate.label and canonical_target(candidate.label, task) is None:
        label_is_answer = False  # a label such as the intent is not the object to extract
    rated_up = candidate.rating is not None and (
        candidate.rating > 0 if task.kind == "label" else candidate.rating >= task.target_min_rating)
    if candidate.correction and candidate.correction.strip():
        answer = candidate.correction
    elif label_is_answer and candidate.label:
        answer = candidate.label
    elif rated_up:
        answer = candidate.completion
    elif candidate.rating is not None and candidate.rating < 0:
        return RATED_DOWN
    elif candidate.rating is not None and task.kind != "label":
        return RATED_LOW
    else:
        return NOT_SELECTED
    if candidate.rating is not None and candidate.rating < 0 and not candidate.correction and (
        answer.strip() == candidate.completion.strip()
    ):
        # The label agrees with an answer the user rejected: trust the user.
        return RATED_DOWN
    if task.kind == "json":
        target = canonical_target(answer, task)
        if target is None:
            return INVALID_TARGET
        answer = target
    turns = [dict(m) for m in candidate.messages]
    while turns and turns[-1].get("role") == "assistant":
        turns.pop()
    if task.system_prompt and not any(m.get("role") == "system" for m in turns):
        turns.insert(0, {"role": "system", "content": task.system_prompt})
    messages = [*turns, {"role": "assistant", "content": answer}]
    return Example(
        example_id=example_id(messages), source_event_id=candidate.event_id,
        label=candidate.label, messages=messages, prompt=candidate.prompt, completion=answer,
        user_id=candidate.user_id,
    )


def target_problem(answer: str, task: TaskSpec) -> str | None:
    """Why ``answer`` cannot be a ``json`` task's target (not an object, or what the schema
    says of it), or None when it can."""
    obj = parse_object(answer)
    if obj is None:
        return "not a JSON object"
    errors = schema_errors(obj, task.schema_document or {})
    return "; ".join(errors[:3]) if errors else None


def canonical_target(answer: str, task: TaskSpec) -> str | None:
    """A ``json`` target in one form (compact separators, keys in the order given), or None
    when it is not an object the task's schema accepts."""
    if target_problem(answer, task) is not None:
        return None
    return canonical_object(answer)


def canonical_object(answer: str) -> str | None:
    """The JSON object ``answer`` holds in :func:`canonical_target`'s form, schema or not,
    or None when it holds none."""
    obj = parse_object(answer)
    return None if obj is None else json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def scrub_turns(messages: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
    """``messages`` with PII redacted, an assistant's answer as an answer
    (:func:`~tuneloop.services.ingest.core.redact_answer`: a JSON object stays valid), and
    the number of spans replaced."""
    out, count = [], 0
    for m in messages:
        r = redact_answer(m["content"]) if m["role"] == "assistant" else redact(m["content"])
        out.append({"role": m["role"], "content": r.text})
        count += r.count
    return out, count


def scrub(example: Example) -> tuple[Example, int]:
    """The example with PII redacted in every turn, and the number of spans replaced."""
    messages, count = scrub_turns(example.messages)
    prompt = redact(example.prompt)
    cleaned = replace(
        example, messages=messages, prompt=prompt.text,
        completion=messages[-1]["content"], example_id=example_id(messages),
    )
    return cleaned, count + prompt.count


@dataclass(frozen=True)
class GoldenIndex:
    """What curation must never train on: golden prompts and their vectors."""

    keys: frozenset[str] = frozenset()
    event_ids: frozenset[str] = frozenset()
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))


class NothingNew(ValueError):
    """No fresh example survived curation: a version of replayed or carried data alone
    would teach a retrain nothing production has not learned."""


@dataclass
class CurationResult:
    examples: list[Example]
    considered: int
    dropped: Counter[str]
    redactions: int
    invalid_targets: list[dict[str, Any]] = field(default_factory=list)  # the first few

    def report(self) -> dict[str, Any]:
        return {
            "considered": self.considered,
            "kept": len(self.examples),
            "dropped": {reason: self.dropped.get(reason, 0) for reason in DROP_REASONS},
            "invalid_targets": self.invalid_targets,
            "redactions": self.redactions,
            "labels": dict(sorted(Counter(e.label or NO_LABEL for e in self.examples).items())),
        }


def near_duplicates(vectors: np.ndarray, threshold: float, block: int = 1024) -> np.ndarray:
    """Greedy in row order: True where a row is within ``threshold`` of an earlier kept row.

    Pairs are found block by block on the lower triangle, so memory stays at
    ``block x n`` however many rows there are.
    """
    n = len(vectors)
    earlier: list[list[int]] = [[] for _ in range(n)]
    for start in range(0, n, block):
        stop = min(start + block, n)
        sims = vectors[start:stop] @ vectors[:stop].T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            if c < start + r:
                earlier[start + r].append(c)
    dropped = np.zeros(n, dtype=bool)
    for i in range(n):
        dropped[i] = any(not dropped[j] for j in earlier[i])
    return dropped


def curate(
    candidates: Sequence[Candidate],
    vectors: np.ndarray,
    golden: GoldenIndex,
    cfg: CurationSettings,
    task: TaskSpec | None = None,
) -> CurationResult:
    """Select and clean ``candidates`` for ``task`` (default: a label task); ``vectors``
    holds their prompts' unit embeddings.

    Raises ``ValueError`` if ``vectors`` does not have one row per candidate.
    """
    if len(vectors) != len(candidates):
        raise ValueError(f"{len(vectors)} vectors for {len(candidates)} candidates: one per row")
    dropped: Counter[str] = Counter()
    invalid: list[dict[str, Any]] = []
    redactions = 0
    # Newest first: when two events say the same thing, the latest feedback wins.
    order = sorted(range(len(candidates)), key=lambda i: candidates[i].occurred_at, reverse=True)
    kept: list[tuple[int, Example]] = []
    seen_keys: set[str] = set()
    for i in order:
        chosen = select(candidates[i], cfg.label_is_answer, task)
        if isinstance(chosen, str):
            dropped[chosen] += 1
            if chosen == INVALID_TARGET and len(invalid) < INVALID_SHOWN and task is not None:
                problem = target_problem(_target_of(candidates[i]), task)
                invalid.append({"event_id": candidates[i].event_id, "reason": problem})
            continue
        example, count = scrub(chosen)
        redactions += count
        if task is not None and task.kind == "json" and (
                problem := target_problem(example.completion, task)):
            # The scrub keeps an object valid JSON, but a redacted string may break the schema.
            dropped[INVALID_TARGET] += 1
            if len(invalid) < INVALID_SHOWN:
                invalid.append({"event_id": candidates[i].event_id,
                                "reason": f"after PII redaction: {problem}"})
            continue
        reason = content_reason(example, cfg)
        key = prompt_key(example.prompt)
        if reason is None and (key in golden.keys or candidates[i].event_id in golden.event_ids):
            reason = GOLDEN_EXACT
        if reason is None and golden.vectors.size and float(
            np.max(golden.vectors @ vectors[i])
        ) >= cfg.near_duplicate_cosine:
            reason = GOLDEN_NEAR
        if reason is None and key in seen_keys:
            reason = DUPLICATE
        if reason is not None:
            dropped[reason] += 1
            continue
        seen_keys.add(key)
        kept.append((i, example))

    near = near_duplicates(vectors[[i for i, _ in kept]], cfg.near_duplicate_cosine)
    dropped[NEAR_DUPLICATE] += int(near.sum())
    survivors = [ex for (_, ex), dup in zip(kept, near, strict=True) if not dup]
    survivors = cap_by(survivors, lambda e: e.user_id, cfg.per_user_cap, USER_CAP, dropped)
    survivors = cap_by(survivors, lambda e: e.label, cfg.per_label_cap, LABEL_CAP, dropped)
    return CurationResult(survivors, len(candidates), dropped, redactions, invalid)


def _target_of(candidate: Candidate) -> str:
    """What :func:`select` took as a json target: the correction, else the answer (a label
    is taken only when it is a valid target, so it is never the invalid one)."""
    if candidate.correction and candidate.correction.strip():
        return candidate.correction
    return candidate.completion


def content_reason(example: Example, cfg: CurationSettings) -> str | None:
    """:data:`EMPTY`, :data:`TOO_SHORT` or :data:`TOO_LONG` when ``example`` is, else None."""
    if not example.prompt.strip() or not example.completion.strip() or any(
        not m["content"].strip() for m in example.messages
    ):
        return EMPTY
    if len(example.prompt.strip()) < cfg.min_chars:
        return TOO_SHORT
    if sum(len(m["content"]) for m in example.messages) > cfg.max_chars:
        return TOO_LONG
    return None


def cap_by(items: list[T], key: Callable[[T], str | None], cap: int, reason: str,
           dropped: Counter[str]) -> list[T]:
    """The first ``cap`` of ``items`` with each ``key`` (None: uncapped), the rest counted
    in ``dropped[reason]``."""
    counts: Counter[str] = Counter()
    out = []
    for item in items:
        k = key(item)
        if k is not None:
            counts[k] += 1
            if counts[k] > cap:
                dropped[reason] += 1
                continue
        out.append(item)
    return out


def split(examples: Sequence[Example], cfg: CurationSettings) -> list[Example]:
    """Assign train/validation/test stratified by label (``cfg.split`` shares).

    Within each label the examples are shuffled and the validation and test
    counts are ``share * n`` rounded stochastically (seeded), so every label
    contributes its share on average, small labels included.
    """
    rng = random.Random(cfg.seed)
    by_label: dict[str, list[Example]] = defaultdict(list)
    for ex in sorted(examples, key=lambda e: e.example_id):
        by_label[ex.label or NO_LABEL].append(ex)
    _, val_share, test_share = cfg.split
    out: list[Example] = []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_val = _stochastic_round(len(group) * val_share, rng)
        n_test = _stochastic_round(len(group) * test_share, rng)
        if n_val + n_test >= len(group):
            n_val, n_test = 0, 0  # too few to hold any out: keep them for training
        for j, ex in enumerate(group):
            name = "validation" if j < n_val else "test" if j < n_val + n_test else "train"
            out.append(replace(ex, split=name))
    return out


def cap_known_labels(examples: Sequence[Example], known: set[str], cap: int
                     ) -> tuple[list[Example], int]:
    """``examples`` with at most ``cap`` train examples of each label in ``known``, and how
    many train examples were left out. Validation and test examples are all kept."""
    counts: Counter[str] = Counter()
    out: list[Example] = []
    left_out = 0
    for ex in examples:
        if ex.split == "train" and ex.label in known:
            counts[ex.label] += 1
            if counts[ex.label] > cap:
                left_out += 1
                continue
        out.append(ex)
    return out, left_out


def _stochastic_round(value: float, rng: random.Random) -> int:
    low = math.floor(value)
    return low + (1 if rng.random() < value - low else 0)


def replay(
    previous: Sequence[Example],
    n_train: int,
    cfg: CurationSettings,
    exclude_keys: set[str],
    golden: GoldenIndex,
) -> list[Example]:
    """Earlier training examples to mix in, so ``replay_share`` of train is old data.

    Drawn round-robin over labels, so every label the previous version taught keeps
    at least ``replay_per_label`` examples (when it has them), however few the new
    data needs: a retrain learns what is new without forgetting a label. Examples
    whose prompt is in ``exclude_keys`` (already in the new data) or in the golden
    set are skipped.
    """
    if cfg.replay_share <= 0 or not previous:
        return []
    pool = [
        ex for ex in previous
        if prompt_key(ex.prompt) not in exclude_keys and prompt_key(ex.prompt) not in golden.keys
        and (ex.source_event_id or "") not in golden.event_ids
    ]
    rng = random.Random(cfg.seed + 1)
    rng.shuffle(pool)
    by_label: dict[str, list[Example]] = defaultdict(list)
    for ex in pool:
        by_label[ex.label or NO_LABEL].append(ex)
    wanted = max(math.ceil(n_train * cfg.replay_share / (1 - cfg.replay_share)),
                 cfg.replay_per_label * len(by_label))
    queues = [by_label[label] for label in sorted(by_label)]
    picked: list[Example] = []
    depth = 0
    while len(picked) < wanted and any(depth < len(q) for q in queues):
        picked += [q[depth] for q in queues if depth < len(q)][: wanted - len(picked)]
        depth += 1
    return [replace(ex, split="train") for ex in picked]


def carry_over(unlearned: Sequence[Example], vectors: np.ndarray, near_golden: Sequence[bool],
               fresh: Sequence[Example], fresh_vectors: np.ndarray, cfg: CurationSettings
               ) -> list[Example]:
    """The examples of versions production never learned to keep in the next version.

    A candidate that was held took its dataset's feedback with it: each event is curated
    once, so without this the next candidate, which again continues from production,
    would see only what came after. ``unlearned`` are those versions' examples, newest
    version first, with their prompts' ``vectors``; each keeps its split (a test example
    stays held out). Left out: a prompt near one already kept, among ``fresh`` (its newer
    answer wins) or carried before it (cosine at least ``near_duplicate_cosine``, as
    curation dedups); one near a golden prompt (``near_golden``); and what would take a
    label past ``per_label_cap``.
    """
    seen = {prompt_key(e.prompt) for e in fresh}
    per_label: Counter[str] = Counter(e.label for e in fresh if e.label is not None)
    dim = int(np.shape(vectors)[1]) if len(vectors) else 0
    kept_vectors = np.asarray(fresh_vectors, dtype=np.float32).reshape(len(fresh), dim)
    out: list[Example] = []
    for ex, vector, near in zip(unlearned, vectors, near_golden, strict=True):
        key = prompt_key(ex.prompt)
        if near or key in seen or (
                ex.label is not None and per_label[ex.label] >= cfg.per_label_cap):
            continue
        if len(kept_vectors) and float((kept_vectors @ vector).max()) >= \
                cfg.near_duplicate_cosine:
            continue
        seen.add(key)
        if ex.label is not None:
            per_label[ex.label] += 1
        kept_vectors = np.vstack([kept_vectors, np.asarray(vector, dtype=np.float32)[None, :]])
        out.append(ex)
    return out


def leaks_golden(vectors: np.ndarray, golden: GoldenIndex, threshold: float) -> np.ndarray:
    """True for each row within ``threshold`` cosine of a golden prompt."""
    if not golden.vectors.size or not len(vectors):
        return np.zeros(len(vectors), dtype=bool)
    return np.asarray((vectors @ golden.vectors.T).max(axis=1) >= threshold)
