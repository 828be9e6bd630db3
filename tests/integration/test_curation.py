"""Curation on real banking77 feedback in a real DuckDB file, with real embeddings."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tuneloop.runtime.settings import Settings
from tuneloop.services.curation import golden
from tuneloop.services.curation.core import NothingNew, prompt_key
from tuneloop.services.curation.datasets import DatasetExists, export_jsonl, save_version, validate_jsonl
from tuneloop.services.curation.run import run_curation
from tuneloop.services.curation.store import Learned, examples_of, fresh_examples, load_candidates
from tuneloop.services.demo import banking77
from tuneloop.services.drift.embeddings import Embedder
from tuneloop.services.ingest.core import RawRecord, prepare_batch
from tuneloop.services.ingest.store import insert_events, write_batch
from tuneloop.services.store.database import Store
from tuneloop.training.tokenizer import token_counter

pytestmark = pytest.mark.integration


def _seed(store: Store, n: int, seed: int, start: datetime) -> None:
    queries = banking77.select(banking77.load("train"), None, n, seed=seed)
    with store.connect() as con:
        insert_events(con, list(banking77.to_events(queries, seed=seed, start=start)))


def test_curate_versions_with_lineage_golden_guard_and_valid_exports(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    t0 = datetime.now(UTC) - timedelta(days=1)
    _seed(store, 1500, seed=11, start=t0)
    with store.connect() as con:
        picked = golden.pick(load_candidates(con), 200, seed=0)
        assert golden.add(con, picked, settings.curation.golden_max) == 200
        gold = golden.load(con)
    embedder = Embedder(settings.embeddings)
    first = run_curation(store, embedder, settings.curation)
    assert first.version == "ds-0001" and first.parents == []
    report = first.report
    assert report["considered"] == 1500
    assert report["kept"] + sum(report["dropped"].values()) == report["considered"]
    assert report["dropped"]["golden example (exact)"] >= 200
    assert set(report["labels"]) <= {q.intent for q in banking77.load("train")}

    version, examples = examples_of(store, first.version)
    golden_keys = {prompt_key(g.prompt) for g in gold}
    assert not {prompt_key(e.prompt) for e in examples} & golden_keys
    assert {e.split for e in examples} == {"train", "validation", "test"}
    with store.connect() as con:
        lineage = con.execute(
            "SELECT count(*), count(DISTINCT source_event_id) FROM dataset_examples d "
            "JOIN feedback f ON f.event_id = d.source_event_id WHERE version = ?", [version]
        ).fetchall()[0]
        row = con.execute(
            "SELECT content_hash, filters, report FROM datasets WHERE version = ?", [version]
        ).fetchall()[0]
    assert lineage[0] == len(examples) == lineage[1]
    assert row[0] == first.content_hash and json.loads(row[1])["near_duplicate_cosine"] == 0.95
    # Every example is the chat the recipe trains on: it ends with the intent to learn.
    assert all(e.messages[-1] == {"role": "assistant", "content": e.completion} for e in examples)
    assert all(e.completion == e.label for e in examples)

    count_tokens = token_counter(settings.training.base_model, settings.models_dir)
    for fmt in ("chat", "completion"):
        path = export_jsonl(examples, tmp_path / f"{version}.{fmt}.jsonl", fmt)
        check = validate_jsonl(path, fmt, count_tokens, settings.curation.max_tokens)
        assert check.ok, check.describe()
        assert check.examples == len(examples) and check.max_tokens_seen > 0

    with store.connect() as con, pytest.raises(DatasetExists):
        save_version(con, version, examples[:3], [], {}, {})

    # New feedback arrives: the next version holds it plus a replay of ds-0001.
    _seed(store, 600, seed=12, start=t0 + timedelta(hours=12))
    second = run_curation(store, embedder, settings.curation)
    assert second.version == "ds-0002" and second.parents == ["ds-0001"]
    assert second.report["considered"] == 600  # only feedback ingested since ds-0001
    assert second.report["replayed"] > 0
    assert second.report["embedding_cache_hits"] > 0
    _, examples2 = examples_of(store, second.version)
    assert not {prompt_key(e.prompt) for e in examples2} & golden_keys

    # With a cap on labels the previous version taught, the fresh train examples of
    # each such label stop at the cap; held-out examples and replay are untouched.
    _seed(store, 600, seed=13, start=t0 + timedelta(hours=18))
    capped_cfg = settings.curation.model_copy(update={"known_label_train_cap": 2})
    third = run_curation(store, embedder, capped_cfg)
    assert third.report["known_label_train_capped"] > 0
    _, examples3 = examples_of(store, third.version)
    known = {e.label for e in examples2 if e.split == "train"}
    with store.connect() as con:
        fresh_ids = {r[0] for r in con.execute(
            "SELECT event_id FROM feedback WHERE seq > (SELECT max(seq) FROM feedback) - 600"
        ).fetchall()}
    fresh_train = Counter(e.label for e in examples3
                          if e.split == "train" and e.source_event_id in fresh_ids)
    assert fresh_train and all(n <= 2 for label, n in fresh_train.items() if label in known)
    assert third.report["splits"]["test"] > 0 and third.report["replayed"] > 0


def test_curate_flow_on_prefect_server(prefect_server: str, settings: Settings) -> None:
    from tuneloop.flows.curate import curate_flow

    store = Store(settings.db_path)
    _seed(store, 400, seed=21, start=datetime.now(UTC) - timedelta(hours=1))
    result = curate_flow(overrides={"home": str(settings.home)})
    assert result["version"] == "ds-0001"
    for export in result["exports"].values():
        assert Path(export["path"]).exists()


def test_a_batch_prepared_early_and_written_late_is_still_curated(
        settings: Settings, store: Store) -> None:
    """Two consumers: one prepares its batch first but writes it after the other, and a
    curation runs in between. The watermark is the write order, so the late batch is in
    the next version instead of falling under the first one's watermark."""
    queries = banking77.select(banking77.load("train"), None, 120, seed=21)
    events = list(banking77.to_events(queries, seed=21))
    records = [RawRecord("feedback.v1", 0, i, str(e.event_id).encode(), e.to_json_bytes())
               for i, e in enumerate(events)]
    t0 = datetime.now(UTC)
    early = prepare_batch(records[:60], now=t0)
    late = prepare_batch(records[60:], now=t0 + timedelta(seconds=5))
    with store.connect() as con:
        write_batch(con, late)
    embedder = Embedder(settings.embeddings)
    first = run_curation(store, embedder, settings.curation)
    assert first.report["considered"] == 60
    with store.connect() as con:
        write_batch(con, early)
    second = run_curation(store, embedder, settings.curation)
    assert second.report["considered"] == 60
    with store.connect() as con:
        curated = {r[0] for r in con.execute(
            "SELECT DISTINCT source_event_id FROM dataset_examples WHERE version = ?",
            [second.version]).fetchall()}
    assert curated & {str(e.event_id) for e in events[:60]}


def test_fresh_examples_are_the_labelled_events_written_after_a_version(
        settings: Settings, store: Store) -> None:
    """The offline gate's newest test data: labelled events after the version's watermark,
    without prompts the version or the golden set already hold, newest first up to a limit."""
    t0 = datetime.now(UTC) - timedelta(hours=2)
    _seed(store, 200, seed=31, start=t0)
    first = run_curation(store, Embedder(settings.embeddings), settings.curation)
    with store.connect() as con:
        assert fresh_examples(con, first.version, settings.curation, 100) == []
    later = banking77.select(banking77.load("test"), None, 80, seed=32)
    _, trained = examples_of(store, first.version)
    repeated = next(e for e in trained if e.split == "train")
    with store.connect() as con:
        insert_events(con, list(banking77.to_events(later, seed=32, start=t0 + timedelta(hours=1))))
        insert_events(con, list(banking77.to_events(
            [banking77.Query(repeated.prompt, repeated.label or "")], seed=33,
            start=t0 + timedelta(hours=1, minutes=30))))
        fresh = fresh_examples(con, first.version, settings.curation, 100)
        newest = fresh_examples(con, first.version, settings.curation, 10)
    later_keys = {prompt_key(q.text) for q in later}
    assert {prompt_key(e.prompt) for e in fresh} <= later_keys  # the repeat is left out
    assert len(fresh) == len(later_keys) and all(e.split == "fresh" for e in fresh)
    assert all(e.completion == e.label for e in fresh)
    assert [e.prompt for e in newest] == [e.prompt for e in fresh[-10:]]


def test_a_retrain_version_carries_what_production_never_learned(
        settings: Settings, store: Store) -> None:
    """A held candidate took its version's feedback with it: the next retrain's version,
    curated against what production learned, carries those examples (splits kept) and
    caps only the labels production knows; once production learned a version, nothing
    before it is carried, nor is a rejected adapter's version."""
    embedder = Embedder(settings.embeddings)
    cfg = settings.curation.model_copy(update={"known_label_train_cap": 1})
    t0 = datetime.now(UTC) - timedelta(hours=3)
    _seed(store, 150, seed=41, start=t0)
    first = run_curation(store, embedder, cfg, learned=Learned(None))  # nothing in production
    _, first_examples = examples_of(store, first.version)
    _seed(store, 150, seed=42, start=t0 + timedelta(hours=1))
    second = run_curation(store, embedder, cfg, learned=Learned(None))  # first was held
    assert second.report["considered"] == 150 and second.parents == [first.version]
    assert second.report["carried"] > 0 and second.report["known_label_train_capped"] == 0
    _, second_examples = examples_of(store, second.version)
    split_of = {e.source_event_id: e.split for e in second_examples}
    carried = [e for e in first_examples if e.source_event_id in split_of]
    assert len(carried) == second.report["carried"]
    assert all(split_of[e.source_event_id] == e.split for e in carried)
    assert len({prompt_key(e.prompt) for e in second_examples}) == len(second_examples)

    # Production learned the second version: the third carries nothing, replays the
    # second's train split and caps the labels it taught.
    _seed(store, 150, seed=43, start=t0 + timedelta(hours=2))
    third = run_curation(store, embedder, cfg, learned=Learned(second.version))
    assert third.report["carried"] == 0 and third.parents == [second.version]
    assert third.report["replayed"] > 0 and third.report["known_label_train_capped"] > 0

    # The third's candidate was rejected (worse, or rolled back): its examples stay out.
    _seed(store, 150, seed=44, start=t0 + timedelta(hours=3))
    fourth = run_curation(store, embedder, cfg,
                          learned=Learned(second.version, frozenset({third.version})))
    assert fourth.report["carried"] == 0 and third.version not in fourth.parents
    # Production's dataset missing from the store: curated as by hand, nothing lost.
    _seed(store, 150, seed=45, start=t0 + timedelta(hours=4))
    fifth = run_curation(store, embedder, cfg, learned=Learned("ds-9999"))
    assert fifth.report["considered"] == 150 and fifth.report["carried"] == 0

    # Nothing arrived since: no version of replayed and carried examples alone (a drift
    # alarm at a quiet hour must not train on old data, nor fail for want of new).
    with pytest.raises(NothingNew, match="nothing new to learn: 0 feedback event"):
        run_curation(store, embedder, cfg, learned=Learned(second.version))
    with store.connect() as con:
        assert con.execute("SELECT max(version) FROM datasets").fetchall()[0][0] == fifth.version
