"""Reading a curated dataset version and the golden set out of DuckDB.

A thin I/O shell: the caller holds the store connection for as long as the read
takes and closes it before training (DuckDB admits one process at a time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import duckdb


@dataclass(frozen=True)
class ChatExample:
    """One example: the chat (ending with the assistant turn), its answer and label."""

    example_id: str
    messages: tuple[dict[str, str], ...]
    completion: str
    label: str | None = None

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The chat without the final assistant turn: what the model is asked."""
        return list(self.messages[:-1])


@dataclass(frozen=True)
class DatasetSplits:
    version: str
    content_hash: str
    train: list[ChatExample]
    validation: list[ChatExample]
    test: list[ChatExample]


class DatasetNotFoundError(LookupError):
    """The requested dataset version is not in the store."""


def read_dataset(con: duckdb.DuckDBPyConnection, version: str) -> DatasetSplits:
    """All splits of dataset ``version``, in ``example_id`` order.

    Raises :class:`DatasetNotFoundError` naming the versions that do exist, and
    ``ValueError`` when the version has no train or no validation examples.
    """
    found = con.execute(
        "SELECT content_hash FROM datasets WHERE version = ?", [version]
    ).fetchall()
    if not found:
        known = [row[0] for row in con.execute(
            "SELECT version FROM datasets ORDER BY created_at DESC LIMIT 10"
        ).fetchall()]
        raise DatasetNotFoundError(
            f"dataset version {version!r} not found; recent versions: {known or 'none'} "
            "(create one with `tuneloop curate`)"
        )
    rows = con.execute(
        "SELECT example_id, split, label, messages, completion FROM dataset_examples "
        "WHERE version = ? ORDER BY example_id", [version]
    ).fetchall()
    splits: dict[str, list[ChatExample]] = {"train": [], "validation": [], "test": []}
    for example_id, split, label, messages, completion in rows:
        splits.setdefault(split, []).append(_example(example_id, messages, completion, label))
    for needed in ("train", "validation"):
        if not splits[needed]:
            raise ValueError(
                f"dataset version {version!r} has no {needed!r} examples; curate it with a "
                "non-zero share for that split"
            )
    return DatasetSplits(version, str(found[0][0]), splits["train"], splits["validation"],
                         splits["test"])


def read_golden(con: duckdb.DuckDBPyConnection) -> list[ChatExample]:
    """The golden set, in ``example_id`` order (may be empty)."""
    rows = con.execute(
        "SELECT example_id, label, messages, completion FROM golden_set ORDER BY example_id"
    ).fetchall()
    return [_example(eid, messages, completion, label) for eid, label, messages, completion in rows]


def _example(example_id: str, messages: Any, completion: str, label: str | None) -> ChatExample:
    chat = json.loads(messages) if isinstance(messages, str) else messages
    turns = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in chat)
    if not turns or turns[-1]["role"] != "assistant":
        # Curation stores the answer in the chat; accept a chat without it too.
        turns = (*turns, {"role": "assistant", "content": completion})
    return ChatExample(example_id, turns, completion, label)
