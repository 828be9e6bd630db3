"""Dataset versions: immutable rows, JSONL exports, and an export validator.

A version (``ds-0001``, ``ds-0002``, ...) is written once, in one transaction,
with its lineage (source event ids per example, parent versions it replays,
the filters and the curation report) and a content hash over its examples.
Nothing updates or deletes a version; writing an existing id raises
:class:`DatasetExists`.

Exports come in two JSONL formats: ``chat`` (``{"messages": [...]}``) and
``completion`` (``{"prompt": ..., "completion": ...}``). :func:`validate_jsonl`
checks a file the way the OpenAI fine-tuning validator does: parse errors,
missing keys, unknown roles, empty content, a missing assistant turn, and
token length against the base model's tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from tuneloop.services.curation.core import SPLITS, Example
from tuneloop.services.curation.preferences import PreferencePair
from tuneloop.services.store import snapshots
from tuneloop.services.store.database import registered

FORMATS = ("chat", "completion")
ROLES = {"system", "user", "assistant", "tool"}
TokenCounter = Callable[[str], int]


class DatasetExists(ValueError):
    """A dataset version id is taken; versions are immutable."""


def content_hash(examples: Sequence[Example],
                 preferences: Sequence[PreferencePair] = ()) -> str:
    """SHA-256 over (split, messages) of every example and (split, id) of every preference
    pair, order-independent."""
    digest = hashlib.sha256()
    lines = [f"{e.split}\t{json.dumps(e.messages, sort_keys=True)}" for e in examples]
    lines += [f"pair\t{p.split}\t{p.pair_id}" for p in preferences]
    for line in sorted(lines):
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def next_version(con: duckdb.DuckDBPyConnection) -> str:
    rows = con.execute("SELECT version FROM datasets").fetchall()
    numbers = [int(m.group(1)) for (v,) in rows if (m := re.fullmatch(r"ds-(\d+)", v))]
    return f"ds-{max(numbers, default=0) + 1:04d}"


def save_version(
    con: duckdb.DuckDBPyConnection,
    version: str,
    examples: Sequence[Example],
    parents: Sequence[str],
    filters: dict[str, Any],
    report: dict[str, Any],
    preferences: Sequence[PreferencePair] = (),
) -> str:
    """Write a new version (its examples and preference pairs) in one transaction; returns
    its content hash.

    Raises :class:`DatasetExists` if ``version`` exists, and ``ValueError`` for an
    empty dataset or an example with an unknown split.
    """
    if not examples:
        raise ValueError(f"{version}: no examples survived curation; nothing to version")
    bad = {e.split for e in examples} - set(SPLITS)
    if bad:
        raise ValueError(f"{version}: unknown split(s) {sorted(bad)}; use {SPLITS}")
    if con.execute("SELECT 1 FROM datasets WHERE version = ?", [version]).fetchall():
        raise DatasetExists(
            f"dataset {version} exists and versions are immutable: curate a new version instead"
        )
    digest = content_hash(examples, preferences)
    counts = Counter(e.split for e in examples)
    rows = pa.Table.from_pylist([{"version": version, **e.to_row()} for e in examples])
    pairs = pa.Table.from_pylist([{"version": version, **p.to_row()} for p in preferences])
    snapshot, snapshot_files = _write_snapshot(con, version, digest, rows, pairs)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            "INSERT INTO datasets (version, created_at, content_hash, parent_versions, filters, "
            "report, n_train, n_validation, n_test, snapshot, snapshot_files) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                version, datetime.now(UTC), digest, json.dumps(list(parents)),
                json.dumps(filters, default=str), json.dumps(report), counts["train"],
                counts["validation"], counts["test"], snapshot, snapshot_files,
            ],
        )
        with registered(con, "incoming_examples", rows):
            con.execute(
                "INSERT INTO dataset_examples SELECT version, example_id, split, source_event_id, "
                "label, messages, prompt, completion FROM incoming_examples"
            )
        if preferences:
            with registered(con, "incoming_pairs", pairs):
                con.execute(
                    "INSERT INTO dataset_preferences SELECT version, pair_id, split, "
                    "source_event_id, source, messages, chosen, rejected FROM incoming_pairs")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return digest


_EXAMPLE_COLUMNS = ("example_id", "split", "source_event_id", "label", "messages", "prompt",
                    "completion")
_PAIR_COLUMNS = ("pair_id", "source_event_id", "messages", "chosen", "rejected", "source",
                 "split")


def _write_snapshot(con: duckdb.DuckDBPyConnection, version: str, digest: str,
                    rows: pa.Table, pairs: pa.Table) -> tuple[str, str] | tuple[None, None]:
    """Upload the version's Parquet snapshot when the store keeps them, read it back and
    check it holds what was curated; returns where it lies and its files' checksums as
    JSON (None, None: no snapshots)."""
    root = snapshots.root(con)
    if root is None:
        return None, None
    tables = {"examples": rows.drop_columns(["version"])}
    tables["preferences"] = (pairs.drop_columns(["version"]) if pairs.num_rows else pa.table(
        {name: pa.array([], pa.string()) for name in _PAIR_COLUMNS}))
    where = f"{root}{version}-{uuid.uuid4().hex[:12]}/"
    files = snapshots.write(con, where, tables)
    _check_snapshot(version, where, files, digest, con)
    return where, json.dumps(files, sort_keys=True)


def _check_snapshot(version: str, where: str, files: dict[str, str], digest: str,
                    con: duckdb.DuckDBPyConnection) -> tuple[list[Example], list[PreferencePair]]:
    """The snapshot's examples and pairs, each file's bytes checked against ``files``;
    raises ``SnapshotError`` unless they are the version's content (``digest``)."""
    examples = [_example(r) for r in _rows(snapshots.read(con, where, "examples",
                                                          files["examples"]), _EXAMPLE_COLUMNS)]
    pairs = [_pair(r) for r in _rows(snapshots.read(con, where, "preferences",
                                                    files["preferences"]), _PAIR_COLUMNS)]
    if content_hash(examples, pairs) != digest:
        raise snapshots.SnapshotError(
            f"dataset {version}: the snapshot at {where} does not hold what the version "
            f"recorded (content hash {digest[:12]}); do not train from it")
    return (sorted(examples, key=lambda e: (e.split, e.example_id)),
            sorted(pairs, key=lambda p: (p.split, p.pair_id)))


def _rows(table: pa.Table, columns: Sequence[str]) -> list[tuple[Any, ...]]:
    data = table.select(list(columns)).to_pydict()
    return list(zip(*(data[c] for c in columns), strict=True))


def _loaded_from_snapshot(con: duckdb.DuckDBPyConnection, version: str
                          ) -> tuple[list[Example], list[PreferencePair]] | None:
    if snapshots.root(con) is None:  # a store without snapshots reads the tables
        return None
    rows = con.execute("SELECT snapshot, snapshot_files, content_hash FROM datasets "
                       "WHERE version = ?", [version]).fetchall()
    if not rows or not rows[0][0]:
        return None
    where, files, digest = rows[0]
    return _check_snapshot(version, str(where), dict(json.loads(files)), str(digest), con)


def _example(r: tuple[Any, ...]) -> Example:
    return Example(example_id=r[0], split=r[1], source_event_id=r[2], label=r[3],
                   messages=json.loads(r[4]) if isinstance(r[4], str) else r[4], prompt=r[5],
                   completion=r[6])


def _pair(r: tuple[Any, ...]) -> PreferencePair:
    return PreferencePair(r[0], r[1], json.loads(r[2]) if isinstance(r[2], str) else r[2],
                          r[3], r[4], r[5], r[6])


def version_hash(con: duckdb.DuckDBPyConnection, version: str) -> str | None:
    """The content hash of dataset ``version``; None when there is no such version."""
    rows = con.execute("SELECT content_hash FROM datasets WHERE version = ?", [version]).fetchall()
    return str(rows[0][0]) if rows else None


def recent_versions(con: duckdb.DuckDBPyConnection, limit: int = 10) -> list[str]:
    """The ``limit`` newest dataset versions, newest first."""
    return [str(v) for (v,) in con.execute(
        "SELECT version FROM datasets ORDER BY created_at DESC LIMIT ?", [limit]).fetchall()]


def report_of(con: duckdb.DuckDBPyConnection, version: str) -> dict[str, Any]:
    """The curation report of dataset ``version``; empty when the version does not exist."""
    rows = con.execute("SELECT report FROM datasets WHERE version = ?", [version]).fetchall()
    if not rows:
        return {}
    raw = rows[0][0]
    return dict(json.loads(raw) if isinstance(raw, str) else raw)


def load_version(con: duckdb.DuckDBPyConnection,
                 version: str) -> tuple[list[Example], list[PreferencePair]]:
    """The examples and preference pairs of ``version`` at once: a snapshot is fetched
    and checked once for both. Raises as :func:`load_examples` does."""
    _check_known(con, version)
    snapshot = _loaded_from_snapshot(con, version)
    if snapshot is not None:
        return snapshot
    return load_examples(con, version), load_preferences(con, version)


def _check_known(con: duckdb.DuckDBPyConnection, version: str) -> None:
    if not con.execute("SELECT 1 FROM datasets WHERE version = ?", [version]).fetchall():
        known = [v for (v,) in con.execute("SELECT version FROM datasets ORDER BY 1").fetchall()]
        raise KeyError(f"no dataset version {version!r}; known: {known or 'none'}")


def load_examples(con: duckdb.DuckDBPyConnection, version: str) -> list[Example]:
    """The examples of ``version``, from its snapshot when it has one (its content hash
    checked); raises ``KeyError`` naming known versions if absent, ``SnapshotError``
    when the snapshot is altered or unreadable."""
    _check_known(con, version)
    snapshot = _loaded_from_snapshot(con, version)
    if snapshot is not None:
        return snapshot[0]
    rows = con.execute(
        f"SELECT {', '.join(_EXAMPLE_COLUMNS)} FROM dataset_examples WHERE version = ? "
        "ORDER BY split, example_id", [version]).fetchall()
    return [_example(r) for r in rows]


def load_preferences(con: duckdb.DuckDBPyConnection, version: str) -> list[PreferencePair]:
    """The preference pairs of ``version`` (none for a version without corrections), from
    its snapshot when it has one."""
    snapshot = _loaded_from_snapshot(con, version)
    if snapshot is not None:
        return snapshot[1]
    rows = con.execute(
        f"SELECT {', '.join(_PAIR_COLUMNS)} FROM dataset_preferences WHERE version = ? "
        "ORDER BY split, pair_id", [version]).fetchall()
    return [_pair(r) for r in rows]


def latest_version(con: duckdb.DuckDBPyConnection) -> str | None:
    rows = con.execute("SELECT version FROM datasets ORDER BY created_at DESC LIMIT 1").fetchall()
    return str(rows[0][0]) if rows else None


def export_jsonl(examples: Sequence[Example], path: Path, fmt: str = "chat") -> Path:
    """Write ``examples`` as JSONL in ``fmt`` (``chat`` or ``completion``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: use one of {FORMATS}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for ex in examples:
            record: dict[str, Any] = (
                {"messages": ex.messages} if fmt == "chat"
                else {"prompt": ex.prompt, "completion": ex.completion}
            )
            if ex.label is not None:
                record["label"] = ex.label
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


@dataclass
class ValidationReport:
    """What :func:`validate_jsonl` found; ``ok`` when there are no errors."""

    examples: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_lines: dict[str, int] = field(default_factory=dict)
    max_tokens_seen: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, kind: str, line: int) -> None:
        self.errors[kind] += 1
        self.first_lines.setdefault(kind, line)

    def describe(self) -> str:
        if self.ok:
            return f"{self.examples} examples OK (longest {self.max_tokens_seen} tokens)"
        return "; ".join(
            f"{kind}: {n} (first at line {self.first_lines[kind]})"
            for kind, n in self.errors.most_common()
        )


def validate_jsonl(
    path: Path, fmt: str = "chat", count_tokens: TokenCounter | None = None,
    max_tokens: int = 512,
) -> ValidationReport:
    """Check every line of an export; never raises for bad content, reports it.

    Error kinds: ``format_error`` (not a JSON object), ``missing_messages``,
    ``message_missing_key``, ``unrecognized_role``, ``empty_content``,
    ``missing_assistant_message``, ``missing_prompt_or_completion`` and
    ``too_many_tokens`` (when ``count_tokens`` is given).
    """
    report = ValidationReport()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        report.examples += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            report.add("format_error", n)
            continue
        if not isinstance(record, dict):
            report.add("format_error", n)
            continue
        texts = _check_chat(record, report, n) if fmt == "chat" else _check_completion(
            record, report, n
        )
        if texts is not None and count_tokens is not None:
            tokens = sum(count_tokens(t) for t in texts)
            report.max_tokens_seen = max(report.max_tokens_seen, tokens)
            if tokens > max_tokens:
                report.add("too_many_tokens", n)
    return report


def _check_chat(record: dict[str, Any], report: ValidationReport, n: int) -> list[str] | None:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        report.add("missing_messages", n)
        return None
    texts = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            report.add("message_missing_key", n)
            return None
        if m["role"] not in ROLES:
            report.add("unrecognized_role", n)
            return None
        if not isinstance(m["content"], str) or not m["content"].strip():
            report.add("empty_content", n)
            return None
        texts.append(m["content"])
    if messages[-1]["role"] != "assistant":
        report.add("missing_assistant_message", n)
        return None
    return texts


def _check_completion(
    record: dict[str, Any], report: ValidationReport, n: int
) -> list[str] | None:
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        report.add("missing_prompt_or_completion", n)
        return None
    if not prompt.strip() or not completion.strip():
        report.add("empty_content", n)
        return None
    return [prompt, completion]
