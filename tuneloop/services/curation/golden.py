"""The golden set: pinned, hand-verifiable examples that are never trained on.

Golden examples come from labelled or corrected feedback (stratified by label)
or from a JSONL file a person wrote, both made as curation makes a training example for
the alias's task. They live in ``golden_set``; every regression check reads them, and
curation refuses any example whose prompt is a golden prompt or a near-duplicate of one.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import duckdb
import numpy as np

from tuneloop.runtime.settings import TaskSpec
from tuneloop.services.curation.core import (
    Candidate,
    Example,
    GoldenIndex,
    prompt_key,
    scrub,
    select,
    target_problem,
)
from tuneloop.services.evaluation.tasks import parse_object

log = logging.getLogger(__name__)
BAD_LINES_SHOWN = 20  # bad lines of a golden JSONL file an error names
FIX_UNJUDGEABLE = ("drop them with `tuneloop golden remove --invalid` and add others with "
                   "`tuneloop golden add`")


class _Answered(Protocol):
    @property
    def completion(self) -> str: ...


AnsweredT = TypeVar("AnsweredT", bound=_Answered)


class GoldenSetFull(ValueError):
    """Adding would take the golden set past ``curation.golden_max``."""


def pick(candidates: Sequence[Candidate], n: int, seed: int = 0,
         task: TaskSpec | None = None) -> list[Example]:
    """Up to ``n`` examples with a verified answer (correction or label; for a ``text``
    task, a correction), judged as ``task`` asks, round-robin by label."""
    by_label: dict[str, list[Example]] = defaultdict(list)
    seen: set[str] = set()
    for cand in sorted(candidates, key=lambda c: c.event_id):
        if not (cand.correction or cand.label):
            continue
        # A rating approves whichever answer was given; for json and text the reference is
        # the correction alone. A label task keeps the rating: a label that agrees with an
        # answer the user rated down is not trusted.
        kind = (task or TaskSpec()).kind
        chosen = select(cand if kind == "label" else replace(cand, rating=None), task=task)
        if isinstance(chosen, str):
            continue
        example, _ = scrub(chosen)
        if task is not None and kind == "json" and target_problem(example.completion, task):
            continue  # the redaction broke the schema, as curation would drop it
        key = prompt_key(example.prompt)
        if key in seen:
            continue
        seen.add(key)
        by_label[example.label or ""].append(example)
    rng = random.Random(seed)
    for group in by_label.values():
        rng.shuffle(group)
    picked: list[Example] = []
    labels = sorted(by_label)
    while len(picked) < n and any(by_label.values()):
        for label in labels:
            if by_label[label] and len(picked) < n:
                picked.append(by_label[label].pop())
    return picked


def from_jsonl(path: Path, task: TaskSpec | None = None) -> list[Example]:
    """Examples from a chat-format JSONL file (``messages`` ending with the assistant's
    answer, plus an optional ``label``), made as curation makes them for ``task`` (default:
    a label task): a ``json`` answer must be an object the task's schema accepts and is kept
    in its canonical form, and the task's system prompt goes first in a chat without one.

    Raises ``ValueError`` naming the bad lines by number, and why; nothing is returned
    from a file with any.
    """
    task = task or TaskSpec()
    out, problems = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            made = _example(json.loads(line), task)
        except json.JSONDecodeError as exc:
            made = f"not JSON ({exc})"
        if isinstance(made, str):
            problems.append(f"{path}:{n}: {made}")
        else:
            out.append(made)
    if problems:
        more = len(problems) - BAD_LINES_SHOWN
        raise ValueError(
            f"{len(problems)} bad lines in {path}, nothing added:\n"
            + "\n".join(problems[:BAD_LINES_SHOWN]) + (f"\n... and {more} more" if more > 0
                                                       else ""))
    return out


def _example(record: Any, task: TaskSpec) -> Example | str:
    """One record as the golden example ``task`` judges, or why it cannot be one."""
    try:
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    except (KeyError, TypeError) as exc:
        return (f"not a chat record (missing or bad {exc}); expected "
                '{"messages": [{"role": ..., "content": ...}, ...], "label": ...}')
    if not all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in messages):
        return ("every message's role and content must be strings (write a JSON answer as its text: "
                '"{\\"city\\": \\"Paris\\"}")')
    label = record.get("label")
    if label is not None and not isinstance(label, str):
        return f"the label {label!r} is not a string"
    if not messages or messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's answer"
    answer = messages[-1]["content"]
    prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    if not prompt.strip():
        return "no user message: nothing to ask"
    if not answer.strip():
        return "the assistant's answer is empty"
    if task.kind == "json" and (why := target_problem(answer, task)) is not None:
        return f"the answer is not an object the json task's schema accepts: {why}"
    # The answer is the reference, as a correction is in curation: the same selection, so
    # a golden example is judged (canonical object, system prompt) as users' examples are.
    chosen = select(Candidate(event_id="", occurred_at=datetime.now(UTC), messages=messages,
                              prompt=prompt, completion=answer, correction=answer, label=label),
                    task=task)
    if isinstance(chosen, str):
        return chosen
    example, _ = scrub(replace(chosen, source_event_id=None))
    if task.kind == "json" and (why := target_problem(example.completion, task)) is not None:
        return f"after PII redaction, the answer is not one the json task's schema accepts: {why}"
    return example


def judgeable(examples: Sequence[AnsweredT], task: TaskSpec) -> tuple[list[AnsweredT], int]:
    """The golden examples ``task`` can judge, and how many it cannot. A ``json`` task
    scores an answer against its reference object, so a reference that is not a JSON object
    (a golden set pinned while the alias was a label task, say) cannot be judged; any
    reference can for the other kinds."""
    if task.kind != "json":
        return list(examples), 0
    kept = [ex for ex in examples if parse_object(ex.completion) is not None]
    return kept, len(examples) - len(kept)


def unjudgeable_note(left_out: int, total: int) -> str:
    """What a check that left out ``left_out`` of ``total`` golden examples says."""
    return (f"{left_out} of {total} golden references are not JSON objects, which a json task "
            f"cannot judge (a golden set from before the task was json?): left out; "
            f"{FIX_UNJUDGEABLE}")


def matching(examples: Sequence[Example], keys: Sequence[str]
             ) -> tuple[list[Example], list[str]]:
    """The golden examples each key names (by example id, or by prompt, case and whitespace
    aside), and the keys that name none."""
    by_id = {ex.example_id: ex for ex in examples}
    by_prompt: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_prompt[prompt_key(ex.prompt)].append(ex)
    found: dict[str, Example] = {}
    unmatched = []
    for key in keys:
        named = [by_id[key]] if key in by_id else by_prompt.get(prompt_key(key), [])
        if not named:
            unmatched.append(key)
        found.update((ex.example_id, ex) for ex in named)
    return list(found.values()), unmatched


def remove(con: duckdb.DuckDBPyConnection, example_ids: Collection[str]) -> int:
    """Delete the golden examples with these ids; returns how many there were."""
    ids = sorted(set(example_ids))
    if not ids:
        return 0
    placeholders = ", ".join("?" for _ in ids)
    (n,) = con.execute(f"SELECT count(*) FROM golden_set WHERE example_id IN ({placeholders})",
                       ids).fetchone() or (0,)
    con.execute(f"DELETE FROM golden_set WHERE example_id IN ({placeholders})", ids)
    log.info("golden set: removed %d examples", n)
    return int(n)


def add(con: duckdb.DuckDBPyConnection, examples: Sequence[Example], cap: int) -> int:
    """Insert examples not already golden (by id or prompt); returns how many were added.

    Raises :class:`GoldenSetFull` when the set would exceed ``cap``.
    """
    existing = {prompt_key(r[0]) for r in con.execute("SELECT prompt FROM golden_set").fetchall()}
    fresh, keys = [], set(existing)
    for ex in examples:
        key = prompt_key(ex.prompt)
        if key not in keys:
            keys.add(key)
            fresh.append(ex)
    if len(existing) + len(fresh) > cap:
        raise GoldenSetFull(
            f"golden set has {len(existing)} examples; adding {len(fresh)} would pass "
            f"curation.golden_max={cap}. Add fewer (--count) or raise golden_max."
        )
    now = datetime.now(UTC)
    if fresh:
        con.executemany(
            "INSERT INTO golden_set VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [
                (ex.example_id, now, ex.source_event_id, ex.label, json.dumps(ex.messages),
                 ex.prompt, ex.completion)
                for ex in fresh
            ],
        )
    log.info("golden set: added %d examples (now %d)", len(fresh), len(existing) + len(fresh))
    return len(fresh)


def load(con: duckdb.DuckDBPyConnection) -> list[Example]:
    """Every golden example, in insertion order."""
    rows = con.execute(
        "SELECT example_id, source_event_id, label, messages, prompt, completion "
        "FROM golden_set ORDER BY added_at, example_id"
    ).fetchall()
    return [
        Example(
            example_id=r[0], source_event_id=r[1], label=r[2], messages=_json(r[3]),
            prompt=r[4], completion=r[5], split="golden",
        )
        for r in rows
    ]


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def index(examples: Sequence[Example], vectors: np.ndarray) -> GoldenIndex:
    """The guard curation checks against; ``vectors`` are the golden prompts' embeddings."""
    return GoldenIndex(
        keys=frozenset(prompt_key(ex.prompt) for ex in examples),
        event_ids=frozenset(ex.source_event_id for ex in examples if ex.source_event_id),
        vectors=vectors.astype(np.float32) if len(examples) else np.zeros((0, 0), np.float32),
    )
