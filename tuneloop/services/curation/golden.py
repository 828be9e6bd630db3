"""The golden set: pinned, hand-verifiable examples that are never trained on.

Golden examples come from labelled or corrected feedback (stratified by label)
or from a JSONL file a person wrote. They live in ``golden_set``; every
regression check reads them, and curation refuses any example whose prompt is a
golden prompt or a near-duplicate of one.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from tuneloop.runtime.settings import TaskSpec
from tuneloop.services.curation.core import (
    Candidate,
    Example,
    GoldenIndex,
    example_id,
    prompt_key,
    scrub,
    select,
)

log = logging.getLogger(__name__)


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


def from_jsonl(path: Path) -> list[Example]:
    """Examples from a chat-format JSONL file (``messages`` plus optional ``label``).

    Raises ``ValueError`` naming the line of the first malformed record.
    """
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}:{n}: not a chat record ({exc}); expected "
                '{"messages": [{"role": ..., "content": ...}, ...], "label": ...}'
            ) from None
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError(f"{path}:{n}: the last message must be the assistant's answer")
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        example, _ = scrub(
            Example(
                example_id=example_id(messages), source_event_id=None, label=record.get("label"),
                messages=messages, prompt=prompt, completion=messages[-1]["content"],
            )
        )
        out.append(example)
    return out


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
