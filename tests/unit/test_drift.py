"""Drift math on synthetic data: the novel share, MMD, classifier AUC, the decision, clusters;
and the reference window the registry's production adapter defines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from tuneloop.runtime.settings import DriftSettings
from tuneloop.services.demo.banking77 import Query, to_events
from tuneloop.services.drift.clusters import what_drifted
from tuneloop.services.drift.core import (
    auc_with_permutations,
    classifier_test,
    detect_drift,
    distinct,
    mmd_test,
    novelty_test,
)
from tuneloop.services.drift.store import load_windows
from tuneloop.services.ingest.store import insert_events
from tuneloop.services.store.database import AnyStore


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _gauss(n: int, dim: int = 16, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    x[:, 0] += shift
    return x.astype(np.float32)


def test_mmd_same_distribution_is_not_significant() -> None:
    rng = np.random.default_rng(1)
    result = mmd_test(_gauss(200, seed=1), _gauss(150, seed=2), 300, rng)
    assert result.p_value > 0.05
    assert abs(result.mmd2) < 0.02


def test_mmd_shifted_mean_is_significant() -> None:
    rng = np.random.default_rng(1)
    result = mmd_test(_gauss(200, seed=1), _gauss(150, shift=1.0, seed=2), 300, rng)
    assert result.p_value <= 1 / 301 + 1e-9
    assert result.mmd2 > 0


def test_mmd_matches_direct_unbiased_estimate() -> None:
    from tuneloop.services.drift.core import KERNEL_SCALES

    x, y = _gauss(30, 4, seed=3), _gauss(20, 4, shift=0.5, seed=4)
    result = mmd_test(x, y, 20, np.random.default_rng(0))
    z = np.concatenate([x, y]).astype(np.float64)
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    k = sum(np.exp(-d2 / (2 * (s * result.bandwidth) ** 2)) for s in KERNEL_SCALES) / 3
    kxx, kyy, kxy = k[:30, :30], k[30:, 30:], k[:30, 30:]
    direct = (
        (kxx.sum() - 30) / (30 * 29) + (kyy.sum() - 20) / (20 * 19) - 2 * kxy.mean()
    )
    assert result.mmd2 == pytest.approx(direct, rel=1e-3, abs=1e-5)


def test_auc_permutation_null_is_centred() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=400)
    labels = np.r_[np.zeros(200), np.ones(200)].astype(np.int64)
    auc, null = auc_with_permutations(scores, labels, 500, rng)
    assert 0.4 < auc < 0.6
    assert abs(null.mean() - 0.5) < 0.01
    perfect, _ = auc_with_permutations(labels.astype(float), labels, 10, rng)
    assert perfect == pytest.approx(1.0)


def test_classifier_separates_shifted_windows() -> None:
    rng = np.random.default_rng(0)
    same = classifier_test(_gauss(300, seed=1), _gauss(300, seed=2), 0.005, 500, rng)
    moved = classifier_test(_gauss(300, seed=1), _gauss(300, shift=1.0, seed=2), 0.005, 500, rng)
    assert same.auc < same.threshold
    assert moved.auc > 0.65 > moved.threshold
    assert moved.p_value < 0.005


def _topics(n: int, topics: list[int], seed: int, dim: int = 32) -> np.ndarray:
    """``n`` unit vectors around the given topic centres (one fixed set of 12 centres)."""
    centres = np.random.default_rng(99).normal(size=(12, dim)) * 3
    rng = np.random.default_rng(seed)
    return _unit(centres[rng.choice(topics, n)] + rng.normal(size=(n, dim)))


def _mixed(n: int, novel: float, seed: int) -> np.ndarray:
    """A current window: ``novel`` of it from topics 8..11, which the reference never has."""
    k = int(round(n * novel))
    return np.concatenate([_topics(n - k, list(range(8)), seed),
                           _topics(k, [8, 9, 10, 11], seed + 1)]) if k else \
        _topics(n, list(range(8)), seed)


def test_novel_share_tracks_the_true_share() -> None:
    estimates = {}
    for share in (0.0, 0.2, 0.5, 1.0):
        runs = [novelty_test(_topics(400, list(range(8)), seed), _mixed(300, share, seed + 50),
                             10, 200, np.random.default_rng(0)) for seed in range(4)]
        estimates[share] = float(np.mean([r.share for r in runs]))
        assert abs(estimates[share] - share) < 0.07, (share, runs)
    assert estimates[0.0] < estimates[0.2] < estimates[0.5] < estimates[1.0]
    ref = _topics(400, list(range(8)), 1)
    assert novelty_test(ref, _mixed(300, 0.5, 2), 10, 200, np.random.default_rng(0)).p_value \
        < 0.01


def test_repeated_questions_are_not_novelty() -> None:
    """A window where every question is asked five times covers nothing new."""
    ref = _topics(400, list(range(8)), 1)
    repeated = np.repeat(_topics(60, list(range(8)), 3), 5, axis=0)
    result = novelty_test(ref, repeated, 10, 200, np.random.default_rng(0))
    assert result.distinct_current == 60
    assert result.share < 0.1 and result.p_value > 0.01


def test_distinct_counts_occurrences() -> None:
    x = _topics(5, [0], 4)
    rows, counts = distinct(np.concatenate([x, x[:2], x[:1]]))
    assert len(rows) == 5 and counts.tolist() == [3, 2, 1, 1, 1]


def test_detect_drift_decision_needs_significance_and_a_practical_share() -> None:
    cfg = DriftSettings(permutations=200, max_points=400)
    ref = _topics(400, list(range(8)), 1)
    quiet = detect_drift(ref, _mixed(300, 0.0, 2), cfg)
    loud = detect_drift(ref, _mixed(300, 0.5, 2), cfg)
    assert not quiet.drifted
    assert loud.drifted and loud.p_value < cfg.alpha and loud.score >= cfg.min_novel_share
    assert 0 <= quiet.score < loud.score <= 1
    assert "DRIFT" in loud.summary() and "novel share" in loud.summary()
    # The same new topics at a share below the practical threshold: reported, not acted on.
    strict = detect_drift(ref, _mixed(300, 0.5, 2), cfg.model_copy(update={"min_novel_share": 0.9}))
    assert not strict.drifted and strict.score == loud.score


def test_detect_drift_rejects_bad_windows() -> None:
    cfg = DriftSettings()
    with pytest.raises(ValueError, match="at least 10"):
        detect_drift(_gauss(5), _gauss(50), cfg)
    with pytest.raises(ValueError, match="same model"):
        detect_drift(_gauss(50, dim=8), _gauss(50, dim=16), cfg)


def test_cluster_report_names_new_cluster() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 32)) * 4
    ref_lab = rng.integers(0, 5, 600)
    ref = _unit(centres[ref_lab] + rng.normal(size=(600, 32)))
    cur_lab = np.r_[rng.integers(0, 5, 240), np.full(60, 5)]
    cur = _unit(centres[cur_lab] + rng.normal(size=(300, 32)))
    texts = [f"message about topic {c} contact me at a@b.com" for c in cur_lab]
    names = [f"topic{c}" for c in cur_lab]
    changes = what_drifted(
        ref, cur, texts, DriftSettings(clusters=6), names, [f"topic{c}" for c in ref_lab]
    )
    assert changes and changes[0].status == "new" and changes[0].name == "topic5"
    assert changes[0].size == 60 and changes[0].share == pytest.approx(0.2)
    assert all("[EMAIL]" in ex and "@" not in ex for ex in changes[0].examples)
    assert all(c.name != "topic0" or c.status != "new" for c in changes)


def test_cluster_report_quiet_window_reports_nothing() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 32)) * 4
    ref = _unit(centres[rng.integers(0, 5, 600)] + rng.normal(size=(600, 32)))
    cur = _unit(centres[rng.integers(0, 5, 300)] + rng.normal(size=(300, 32)))
    assert what_drifted(ref, cur, ["x"] * 300, DriftSettings(clusters=5)) == []


def test_the_reference_is_what_the_aliases_production_adapter_was_trained_on(
        tmp_path: Path, any_store: AnyStore) -> None:
    """The registry answers which adapter is production of the alias; its dataset's source
    events are the reference, and another alias (or none) falls back to the oldest events."""
    events = list(to_events([Query(f"question {i}", f"intent{i % 3}") for i in range(90)],
                            seed=1, start=datetime.now(UTC) - timedelta(hours=1)))
    store = any_store
    trained_on = [str(e.event_id) for e in events[30:60]]
    with store.connect() as con:
        insert_events(con, events)
        for i, event_id in enumerate(trained_on):
            con.execute("INSERT INTO dataset_examples VALUES ('ds-0001', ?, 'train', ?, 'x', "
                        "'[]', 'p', 'x')", [f"x{i}", event_id])
        con.execute("INSERT INTO adapters (version, name, alias, created_at, base_model, "
                    "base_hash, path, sha256, metrics, state, dataset_version) VALUES ('v1', "
                    "'support-bot-v1', 'support-bot', now(), 'b', 'h', '/x', 's', '{}', "
                    "'production', 'ds-0001')")
        cfg = DriftSettings(current_window_events=20, reference_window_events=20)
        ref, cur = load_windows(con, cfg, "support-bot")
        assert ref.desc == "production adapter v1 (dataset ds-0001)"
        assert ref.event_ids == trained_on
        assert cur.event_ids == [str(e.event_id) for e in events[-20:]]
        for alias in ("other-bot", None):
            ref, _ = load_windows(con, cfg, alias)
            assert ref.desc == "oldest 20 events"
            assert ref.event_ids == [str(e.event_id) for e in events[:20]]


def test_the_current_window_follows_ingestion_not_the_clients_clock(
        tmp_path: Path, any_store: AnyStore) -> None:
    """1,000 events a client stamped in 2030 do not freeze the current window: it holds the
    newest events tuneloop ingested, and the report counts those stamped far from their
    ingestion (future and past)."""
    from tuneloop.services.drift.check import compare_windows
    from tuneloop.services.drift.store import current_window

    def batch(n: int, seed: int, start: datetime) -> list:
        return list(to_events([Query(f"question {seed} {i}", "intent") for i in range(n)],
                              seed=seed, start=start))

    store = any_store
    cfg = DriftSettings(current_window_events=100)
    now = datetime.now(UTC)
    with store.connect() as con:
        insert_events(con, batch(1000, 1, datetime(2030, 1, 1, tzinfo=UTC)))
        fresh = batch(100, 2, now - timedelta(minutes=5))
        insert_events(con, fresh)
        cur = current_window(con, cfg)
        assert cur.event_ids == [str(e.event_id) for e in fresh]
        assert cur.clock == {"future": 0, "past": 0}

        late = batch(3, 3, now - timedelta(days=30))
        ahead = batch(7, 4, datetime(2031, 1, 1, tzinfo=UTC))
        insert_events(con, late)
        insert_events(con, ahead)
        cur = current_window(con, cfg)
        assert cur.event_ids[-10:] == [str(e.event_id) for e in late + ahead]
        assert cur.clock == {"future": 7, "past": 3}

        ref = current_window(con, DriftSettings(current_window_events=100), cur.event_ids)
    vectors = _unit(np.random.default_rng(0).normal(size=(len(ref) + len(cur), 16)))
    report = compare_windows(ref, cur, vectors, DriftSettings(permutations=50, clusters=2))
    assert report.methods()["occurred_at_flags"] == {"future": 7, "past": 3}
    assert report.summary().endswith(
        "occurred_at far from ingestion: 7 from the future, 3 from the past")


def test_the_embedding_cache_gives_back_what_it_stored(any_store: AnyStore) -> None:
    import numpy as np

    from tuneloop.services.drift.embeddings import read_cache, write_cache

    vectors = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    with any_store.connect() as con:
        write_cache(con, ["a", "b", "c"], vectors, "m1")
        write_cache(con, ["a"], vectors[:1] + 1, "m1")  # cached already: left as it is
        write_cache(con, ["a"], vectors[:1] + 2, "m2")
        got = read_cache(con, ["c", "a", "zz"], "m1")
        other = read_cache(con, ["a", "b"], "m2")
    assert sorted(got) == ["a", "c"] and sorted(other) == ["a"]
    assert np.allclose(got["a"], vectors[0]) and np.allclose(got["c"], vectors[2])
    assert np.allclose(other["a"], vectors[0] + 2)
