"""Curation's queries: feedback, dataset versions and their watermark, in DuckDB.

The entry point that curates a version is :func:`tuneloop.services.curation.run.run_curation`;
this module reads what it needs (:func:`read_inputs`) and writes what it made
(:func:`write_version`), and answers the questions other stages ask of feedback and
versions: the version a retrain already curated (:func:`find_curated`), how many labelled
events came since the latest version (:func:`new_labelled_events`), and the labelled
events written after a version (:func:`fresh_examples`, for the canary).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import duckdb

from tuneloop.runtime.settings import CurationSettings, TaskSpec
from tuneloop.services.curation import golden
from tuneloop.services.curation.core import Candidate, Example, prompt_key, scrub, select
from tuneloop.services.curation.datasets import (
    latest_version,
    load_examples,
    load_version,
    next_version,
    save_version,
)
from tuneloop.services.curation.preferences import PreferencePair
from tuneloop.services.store.database import AnyStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurationRun:
    """A curated dataset version: its id, content hash, parent versions and report."""

    version: str
    content_hash: str
    parents: list[str]
    report: dict[str, Any]


def since_latest(con: Any, table_prefix: str = "") -> tuple[str, list[Any]]:
    """SQL (``AND ...``) selecting feedback written after the latest dataset version's
    watermark, and its arguments; nothing when there is no version yet. ``table_prefix``
    qualifies the columns when the caller's query names feedback by an alias (``"f."``).

    The watermark is the write sequence ``seq`` (assigned in the write's transaction, so
    a batch prepared early and written late is never under it); versions curated before
    the sequence existed fall back to their ingest time.
    """
    rows = con.execute(
        "SELECT (filters->>'considered_through_seq'), (filters->>'considered_through') "
        "FROM datasets ORDER BY created_at DESC LIMIT 1").fetchall()
    return _after(rows, table_prefix)


def since_version(con: Any, version: str | None, table_prefix: str = "") -> tuple[str, list[Any]]:
    """As :func:`since_latest`, after ``version``'s watermark (nothing for None or a
    version the store does not hold: all feedback)."""
    rows = [] if version is None else con.execute(
        "SELECT (filters->>'considered_through_seq'), (filters->>'considered_through') "
        "FROM datasets WHERE version = ?", [version]).fetchall()
    return _after(rows, table_prefix)


def _after(rows: list[tuple[Any, ...]], table_prefix: str) -> tuple[str, list[Any]]:
    if not rows:
        return "", []
    seq, through = rows[0]
    if seq is not None:
        return f" AND {table_prefix}seq > ?", [int(seq)]
    if through is not None:
        return f" AND {table_prefix}ingested_at > ?", [datetime.fromisoformat(through)]
    return "", []


CANDIDATE_COLUMNS = ("event_id, occurred_at, messages, user_text, completion, rating, "
                     "correction, label, user_id, CASE WHEN (metadata->>'source') = "
                     "'gateway.preference' THEN (metadata->'preference') END")


def _candidate(r: tuple[Any, ...]) -> Candidate:
    """A ``feedback`` row selected with ``CANDIDATE_COLUMNS``, as curation sees it."""
    return Candidate(
        event_id=r[0], occurred_at=r[1],
        messages=json.loads(r[2]) if isinstance(r[2], str) else r[2], prompt=r[3],
        completion=r[4], rating=r[5], correction=r[6], label=r[7], user_id=r[8],
        preference=_preference(r[9]),
    )


def _preference(raw: Any) -> dict[str, Any] | None:
    """A side-by-side verdict's chosen and rejected answers, when the gateway recorded one
    (anything else in the column is ignored)."""
    value = json.loads(raw) if isinstance(raw, str) else raw
    if isinstance(value, dict) and isinstance(value.get("chosen"), str) and isinstance(
            value.get("rejected"), str):
        return value
    return None


def load_candidates(con: Any, include_used: bool = False,
                    through_seq: int | None = None) -> list[Candidate]:
    """Feedback ingested since the latest version was curated (all of it if ``include_used``),
    up to ``through_seq`` when given.

    Each event is considered by one version only, so drop counts add up across
    versions and a dropped event is not re-examined every run. The bound keeps events
    that land meanwhile (ingest writes beside curation in a Postgres store) for the
    next version, which starts after ``through_seq``.
    """
    where, args = ("", []) if include_used else since_latest(con)
    if through_seq is not None:
        where, args = f"{where} AND seq <= ?", [*args, int(through_seq)]
    rows = con.execute(
        f"SELECT {CANDIDATE_COLUMNS} FROM feedback WHERE true{where} "
        "ORDER BY occurred_at, event_id", args,
    ).fetchall()
    return [_candidate(r) for r in rows]


@dataclass(frozen=True)
class CurationInputs:
    """What one curation run reads: the candidates, the golden set, the version replay
    draws from and its train split, what production never learned (to carry over), and
    the watermark the next run starts after."""

    candidates: list[Candidate]
    golden: list[Example]
    parent: str | None  # the version whose train split replay draws from
    previous: list[Example]  # its train examples
    through: datetime | None  # the newest ingest time considered
    through_seq: int | None  # the highest write sequence considered
    unlearned: Unlearned = field(default_factory=lambda: Unlearned([], [], [], []))


@dataclass(frozen=True)
class Learned:
    """What the production adapter a retrain continues from was trained on: its dataset
    ``version`` (None: no production adapter yet), and the dataset versions of the alias's
    rejected adapters (``rejected``: worse than their incumbent, or rolled back), whose
    examples are never carried."""

    version: str | None
    rejected: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Unlearned:
    """The examples and preference pairs of the versions curated after production's that
    no rejected adapter learned, newest version first; ``index[i]`` is the position in
    ``versions`` of ``examples[i]``."""

    versions: list[str]
    examples: list[Example]
    index: list[int]
    pairs: list[PreferencePair]


def read_inputs(con: duckdb.DuckDBPyConnection, include_used: bool = False,
                learned: Learned | None = None) -> CurationInputs:
    """Everything a curation run reads, in one connection (see :class:`CurationInputs`).

    Without ``learned``, replay draws from the latest version (``tuneloop curate``). With
    it (the loop's retrain, which continues from production), replay draws from the
    version production learned, and the versions curated after it (see
    :class:`Unlearned`) are read to carry over. A ``learned`` version the store does not
    hold (a registry restored without its datasets) is logged and read as no ``learned``.
    """
    through, through_seq = con.execute(
        "SELECT max(ingested_at), max(seq) FROM feedback").fetchall()[0]
    candidates = load_candidates(con, include_used, through_seq)
    gold = golden.load(con)
    if learned is not None and learned.version is not None and not con.execute(
            "SELECT 1 FROM datasets WHERE version = ?", [learned.version]).fetchall():
        log.warning("production's dataset %s is not in the store: curating as `tuneloop "
                    "curate` does (replay from the latest version, nothing carried)",
                    learned.version)
        learned = None
    parent = latest_version(con) if learned is None else learned.version
    taught = load_examples(con, parent) if parent else []
    previous = [e for e in taught if e.split == "train"]
    unlearned = Unlearned([], [], [], [])
    if learned is not None and not include_used:
        unlearned = _unlearned(con, learned, {prompt_key(e.prompt) for e in taught})
    return CurationInputs(candidates, gold, parent, previous, through, through_seq, unlearned)


def _unlearned(con: Any, learned: Learned, taught: set[str]) -> Unlearned:
    """:class:`Unlearned` after ``learned``: a prompt production's version holds (the
    replay a held version took from it) is not unlearned."""
    versions = [v for v in versions_after(con, learned.version) if v not in learned.rejected]
    loaded = [load_version(con, v) for v in versions]
    by_version = [[e for e in examples if prompt_key(e.prompt) not in taught]
                  for examples, _ in loaded]
    return Unlearned(versions, [e for examples in by_version for e in examples],
                     [i for i, examples in enumerate(by_version) for _ in examples],
                     [p for _, pairs in loaded for p in pairs])


def versions_after(con: Any, version: str | None) -> list[str]:
    """Dataset versions the loop curated after ``version`` (all of them for None), newest
    first; a version curated from every event (``tuneloop curate --include-used``) is
    not one of them."""
    mine = "coalesce(filters->>'include_used', 'false') <> 'true'"
    if version is None:
        rows = con.execute(f"SELECT version FROM datasets WHERE {mine} "
                           "ORDER BY created_at DESC").fetchall()
    else:
        rows = con.execute(
            f"SELECT version FROM datasets WHERE {mine} AND created_at > (SELECT created_at "
            "FROM datasets WHERE version = ?) ORDER BY created_at DESC", [version]).fetchall()
    return [str(r[0]) for r in rows]


def write_version(con: duckdb.DuckDBPyConnection, examples: list[Example], parents: list[str],
                  filters: dict[str, Any], report: dict[str, Any],
                  preferences: Sequence[PreferencePair] = ()) -> tuple[str, str]:
    """Save ``examples`` and ``preferences`` as the next version; returns it and its
    content hash.

    Raises ``ValueError`` (from :func:`save_version`) when ``examples`` is empty.
    """
    version = next_version(con)
    return version, save_version(con, version, examples, parents, filters, report, preferences)


def find_curated(store: AnyStore, run_key: str) -> CurationRun | None:
    """The dataset version curated under ``run_key``, if there is one."""
    with store.connect() as con:
        rows = con.execute(
            "SELECT version, content_hash, parent_versions, report FROM datasets "
            "WHERE (filters->>'run_key') = ? ORDER BY created_at DESC LIMIT 1", [run_key]
        ).fetchall()
    if not rows:
        return None
    version, digest, parents, report = rows[0]
    return CurationRun(version, digest, list(json.loads(parents) if isinstance(parents, str)
                                             else parents or []),
                       json.loads(report) if isinstance(report, str) else dict(report or {}))


def new_labelled_events(store: AnyStore) -> int:
    """Labelled or corrected feedback ingested since the latest version was curated."""
    with store.connect() as con:
        where, args = since_latest(con)
        return int(con.execute(
            "SELECT count(*) FROM feedback WHERE (label IS NOT NULL OR correction IS NOT NULL)"
            f"{where}", args).fetchall()[0][0])


def fresh_examples(con: Any, dataset_version: str, cfg: CurationSettings,
                   limit: int, task: TaskSpec | None = None) -> list[Example]:
    """Labelled feedback written after ``dataset_version`` was curated, as examples.

    Held out from that version by time, this is the closest test an adapter trained on
    it can get to the traffic it will serve. Only people's labels and corrections count
    (a good rating approves the answer that was given, which favours the version that
    gave it). Redacted like curation; a prompt already in the version or in the golden
    set is left out, and a prompt asked again counts once. The newest ``limit``.
    """
    rows = con.execute("SELECT (filters->>'considered_through_seq') FROM datasets "
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
            chosen = select(replace(_candidate(r), rating=None), cfg.label_is_answer, task)
            if isinstance(chosen, str) or prompt_key(chosen.prompt) in seen:
                continue
            seen.add(prompt_key(chosen.prompt))
            out.append(replace(scrub(chosen)[0], split="fresh"))
            if len(out) >= limit:
                break
    return out[::-1]


def examples_of(store: AnyStore, version: str | None) -> tuple[str, list[Example]]:
    """A version's examples (the latest if ``version`` is None)."""
    with store.connect() as con:
        chosen = version or latest_version(con)
        if chosen is None:
            raise KeyError("no dataset version yet: run `tuneloop curate` first")
        return chosen, load_examples(con, chosen)
