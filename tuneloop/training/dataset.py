"""A curated dataset version and the golden set as the recipe trains on them.

Curation's shell reads them (``tuneloop.services.curation``); the caller holds the store
connection for as long as the read takes and closes it before training (DuckDB admits
one process at a time).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb

from tuneloop.services.curation import datasets, golden
from tuneloop.services.curation.core import Example
from tuneloop.services.curation.preferences import PreferencePair


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
    preferences: list[PreferencePair] = field(default_factory=list)


class DatasetNotFoundError(LookupError):
    """The requested dataset version is not in the store."""


def read_dataset(con: duckdb.DuckDBPyConnection, version: str) -> DatasetSplits:
    """All splits of dataset ``version``, in ``example_id`` order.

    Raises :class:`DatasetNotFoundError` naming the versions that do exist, and
    ``ValueError`` when the version has no train or no validation examples.
    """
    digest = datasets.version_hash(con, version)
    if digest is None:
        known = datasets.recent_versions(con, 10)
        raise DatasetNotFoundError(
            f"dataset version {version!r} not found; recent versions: {known or 'none'} "
            "(create one with `tuneloop curate`)"
        )
    splits: dict[str, list[ChatExample]] = {"train": [], "validation": [], "test": []}
    examples, preferences = datasets.load_version(con, version)
    for ex in examples:  # by split, then example_id
        splits.setdefault(ex.split, []).append(_example(ex))
    for needed in ("train", "validation"):
        if not splits[needed]:
            raise ValueError(
                f"dataset version {version!r} has no {needed!r} examples; curate it with a "
                "non-zero share for that split"
            )
    return DatasetSplits(version, digest, splits["train"], splits["validation"], splits["test"],
                         preferences)


def read_golden(con: duckdb.DuckDBPyConnection) -> list[ChatExample]:
    """The golden set, in ``example_id`` order (may be empty)."""
    return sorted((_example(ex) for ex in golden.load(con)), key=lambda ex: ex.example_id)


def _example(ex: Example) -> ChatExample:
    turns = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in ex.messages)
    if not turns or turns[-1]["role"] != "assistant":
        # Curation stores the answer in the chat; accept a chat without it too.
        turns = (*turns, {"role": "assistant", "content": ex.completion})
    return ChatExample(ex.example_id, turns, ex.completion, ex.label)
