"""Drift on real banking77 traffic, real MiniLM embeddings and a real DuckDB file.

A window of the reference's intents alarms in at most 5% of 20 resampled windows, and
so does one from banking77's other split (a change of style, not of topic); a window
with half its traffic from unseen intents alarms in at least 95% of them, its novel
share is near 0.5, and the cluster report names those intents; at a fifth, the novel
share reads well above that of same-intent windows.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from tuneloop.runtime.settings import DriftSettings, EmbeddingSettings, Settings
from tuneloop.services.demo import banking77
from tuneloop.services.drift.check import run_check
from tuneloop.services.drift.clusters import what_drifted
from tuneloop.services.drift.core import detect_drift
from tuneloop.services.drift.embeddings import Embedder, embed_texts
from tuneloop.services.drift.plots import plot_drift_history
from tuneloop.services.drift.store import load_windows, report_history
from tuneloop.services.ingest.store import insert_events
from tuneloop.services.store.database import Store

pytestmark = pytest.mark.integration

WINDOWS = 20
N_REF, N_CUR, NOVEL_SHARE = 1000, 400, 0.5
UNSEEN = 5


@dataclass
class Pool:
    store: Store
    embedder: Embedder
    ref: list[banking77.Query]
    seen: list[banking77.Query]
    unseen: list[banking77.Query]
    unseen_intents: set[str]
    other_split: list[banking77.Query]
    vectors: dict[str, np.ndarray]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Pool:
    """Reference traffic in DuckDB, plus embedded pools of seen and unseen-intent queries."""
    queries = banking77.load("train") + banking77.load("test")
    intents = sorted({q.intent for q in queries})
    unseen_intents = set(random.Random(7).sample(intents, UNSEEN))
    unseen = banking77.select(queries, sorted(unseen_intents), seed=2)
    store = Store(tmp_path_factory.mktemp("drift") / "tuneloop.duckdb")
    embedder = Embedder(EmbeddingSettings())
    train = banking77.select(banking77.load("train"),
                             [i for i in intents if i not in unseen_intents], seed=1)
    ref, rest = train[:N_REF], train[N_REF : N_REF + 3000]
    other_split = banking77.select(banking77.load("test"),
                                   [i for i in intents if i not in unseen_intents], seed=3)
    with store.connect() as con:
        insert_events(con, list(banking77.to_events(ref, seed=1)))
    texts = [q.text for q in ref + rest + unseen + other_split]
    vectors, stats = embed_texts(store, embedder, texts)
    assert stats.encoded == stats.unique
    return Pool(store, embedder, ref, rest, unseen, unseen_intents, other_split,
                dict(zip(texts, vectors, strict=True)))


def _vec(pool: Pool, qs: list[banking77.Query]) -> np.ndarray:
    return np.stack([pool.vectors[q.text] for q in qs])


def test_embedding_cache_never_embeds_twice(pool: Pool) -> None:
    texts = [q.text for q in pool.ref[:300]]
    again, stats = embed_texts(pool.store, pool.embedder, texts + texts[:50])
    assert stats.encoded == 0 and stats.hits == stats.unique
    np.testing.assert_allclose(again[:300], _vec(pool, pool.ref[:300]), atol=1e-6)
    with pool.store.connect() as con:
        rows = con.execute("SELECT count(*), count(DISTINCT content_hash) FROM embeddings")
        total, distinct = rows.fetchall()[0]
    assert total == distinct


def test_the_onnx_backends_against_the_library(pool: Pool, tmp_path: Path) -> None:
    """The default ONNX backend gives the library's vectors; int8 moves them a little and
    caches them apart; a model it cannot run (not mean-pooled) falls back to torch."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer

    from tuneloop.services.drift.embeddings import UnsupportedModel, resolve_model

    texts = [q.text for q in pool.ref[:200]]
    library = np.asarray(pool.embedder.model.encode(texts, normalize_embeddings=True))
    onnx = Embedder(EmbeddingSettings(backend="onnx", onnx_dir=tmp_path))
    vectors = onnx.encode(texts)
    assert onnx.onnx is not None and onnx.onnx.path.is_relative_to(tmp_path)
    assert np.sum(vectors * library, axis=1).min() > 0.99999
    assert onnx.name == "all-MiniLM-L6-v2"

    int8 = Embedder(EmbeddingSettings(backend="onnx-int8", onnx_dir=tmp_path))
    cosine = np.sum(int8.encode(texts) * library, axis=1)
    assert int8.name == "all-MiniLM-L6-v2+int8"
    assert 0.98 < cosine.mean() < 0.99999 and cosine.min() > 0.9

    source = resolve_model("all-MiniLM-L6-v2")
    cls = SentenceTransformer(modules=[Transformer(source), Pooling(384, pooling_mode="cls")],
                              device="cpu")
    fallback = Embedder(EmbeddingSettings(backend="onnx", onnx_dir=tmp_path))
    fallback._model = cls
    expected = np.asarray(cls.encode(texts[:20], normalize_embeddings=True))
    np.testing.assert_allclose(fallback.encode(texts[:20]), expected, atol=1e-6)
    strict = Embedder(EmbeddingSettings(backend="onnx-int8", onnx_dir=tmp_path))
    strict._model = cls
    with pytest.raises(UnsupportedModel, match="mean-pooled"):
        strict.encode(texts[:2])


def test_false_positive_rate_on_same_intent_windows(pool: Pool) -> None:
    cfg = DriftSettings()
    ref = _vec(pool, pool.ref)
    alarms = []
    for w in range(WINDOWS):
        window = random.Random(100 + w).sample(pool.seen, N_CUR)
        alarms.append(detect_drift(ref, _vec(pool, window), cfg).drifted)
    fpr = sum(alarms) / WINDOWS
    print(f"FIGURE drift_test_false_positive_rate={fpr:.3f}")
    assert fpr <= 0.05


def test_a_change_of_style_is_not_drift(pool: Pool) -> None:
    """The reference's intents from banking77's other split (another collection batch),
    with repeats as real traffic has them: low novel share, no retrain."""
    cfg = DriftSettings()
    ref = _vec(pool, pool.ref)
    alarms, scores = [], []
    for w in range(WINDOWS):
        rng = random.Random(300 + w)
        window = [rng.choice(pool.other_split) for _ in range(N_CUR)]
        report = detect_drift(ref, _vec(pool, window), cfg)
        alarms.append(report.drifted)
        scores.append(report.score)
    print(f"style windows: alarms {sum(alarms)}/{WINDOWS}, mean novel share "
          f"{np.mean(scores):.3f}")
    assert sum(alarms) / WINDOWS <= 0.05
    assert np.mean(scores) < cfg.min_novel_share


def test_detects_unseen_intents_and_names_them(pool: Pool) -> None:
    cfg = DriftSettings()
    ref = _vec(pool, pool.ref)
    ref_labels: list[str | None] = [q.intent for q in pool.ref]
    detected, named, scores = 0, 0, []
    n_novel = int(N_CUR * NOVEL_SHARE)
    for w in range(WINDOWS):
        rng = random.Random(200 + w)
        window = rng.sample(pool.seen, N_CUR - n_novel) + rng.sample(pool.unseen, n_novel)
        rng.shuffle(window)
        cur = _vec(pool, window)
        report = detect_drift(ref, cur, cfg)
        detected += report.drifted
        scores.append(report.score)
        changes = what_drifted(
            ref, cur, [q.text for q in window], cfg, [q.intent for q in window], ref_labels
        )
        reported = {lab.label for c in changes for lab in c.labels} | {
            lab for c in changes for lab in c.new_labels}
        named += pool.unseen_intents <= reported
    print(f"FIGURE drift_test_detection_rate={detected / WINDOWS:.3f} named={named / WINDOWS:.3f}"
          f" mean_novel_share={np.mean(scores):.3f}")
    assert detected / WINDOWS >= 0.95
    assert abs(np.mean(scores) - NOVEL_SHARE) < 0.1
    assert named / WINDOWS >= 0.95


def test_the_novel_share_grows_with_the_shift(pool: Pool) -> None:
    """A fifth of the traffic from unseen intents reads well above same-intent windows
    (the estimate runs low where new intents sit among old ones: see bench drift)."""
    cfg = DriftSettings()
    ref = _vec(pool, pool.ref)
    n_novel = int(N_CUR * 0.2)
    scores = []
    for w in range(WINDOWS):
        rng = random.Random(400 + w)
        window = rng.sample(pool.seen, N_CUR - n_novel) + rng.sample(pool.unseen, n_novel)
        scores.append(detect_drift(ref, _vec(pool, window), cfg).score)
    print(f"novel share at 20% unseen: mean {np.mean(scores):.3f}")
    assert 0.08 < np.mean(scores) < 0.3


def test_run_check_persists_report_and_plots(pool: Pool, tmp_path: Path) -> None:
    """The shell end to end: windows from DuckDB, cached embeddings, report row, plot."""
    n_novel = int(N_CUR * NOVEL_SHARE)
    current = pool.seen[-(N_CUR - n_novel) :] + pool.unseen[:n_novel]
    random.Random(3).shuffle(current)
    later = datetime.now(UTC) + timedelta(hours=1)
    with pool.store.connect() as con:
        insert_events(con, list(banking77.to_events(current, seed=9, start=later)))
    cfg = DriftSettings(current_window_events=N_CUR, reference_window_events=N_REF)
    with pool.store.connect() as con:
        ref, cur = load_windows(con, cfg, "support-bot")
    assert len(ref) == N_REF and len(cur) == N_CUR and not set(ref.event_ids) & set(cur.event_ids)
    report_id, report = run_check(pool.store, pool.embedder, cfg, "support-bot")
    assert report.drifted and report.clusters
    named = {c["name"] for c in report.clusters}
    assert named & pool.unseen_intents
    with pool.store.connect() as con:
        rows = report_history(con)
        stored = con.execute(
            "SELECT drifted, methods FROM drift_reports WHERE report_id = ?", [report_id]
        ).fetchall()
    assert stored[0][0] is True and "mmd" in json.loads(stored[0][1])
    png = plot_drift_history(rows, tmp_path / "drift.png")
    assert png.stat().st_size > 1000


def test_detect_drift_flow_emits_event(prefect_server: str, settings: Settings,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The flow on a real Prefect server: report persisted, drift event on the server, and
    the run's stored parameters are the overrides it was given, with no secret in them."""
    import asyncio

    from prefect.client.orchestration import get_client

    from tuneloop.flows.drift import DRIFT_EVENT, detect_drift_flow

    monkeypatch.setenv("TUNELOOP_SERVING__ADMIN_KEY", "key-that-must-not-be-stored")
    queries = banking77.load("test")
    intents = sorted({q.intent for q in queries})
    ref = banking77.select(queries, intents[:60], 600, seed=1)
    # Strong drift (40% from five new intents): this test is about the wiring.
    cur = banking77.select(queries, intents[:60], 120, seed=2) + banking77.select(
        queries, intents[60:65], 80, seed=3)
    store = Store(settings.db_path)
    t0 = datetime.now(UTC) - timedelta(hours=2)
    with store.connect() as con:
        insert_events(con, list(banking77.to_events(ref, seed=1, start=t0)))
        insert_events(con, list(banking77.to_events(cur, seed=2, start=t0 + timedelta(hours=1))))
    overrides = {"home": str(settings.home), "drift.current_window_events": 200}
    state = detect_drift_flow(overrides=overrides, return_state=True)
    result = state.result()
    assert result["drifted"] and result["event_id"]
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    assert run.parameters == {"overrides": overrides}
    assert "key-that-must-not-be-stored" not in json.dumps(run.parameters)
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM drift_reports").fetchall()[0][0] == 1

    async def find_event() -> bool:
        async with get_client() as client:
            for _ in range(30):
                response = await client._client.post(
                    "/events/filter", json={"filter": {"event": {"name": [DRIFT_EVENT]}}}
                )
                events = response.json().get("events", [])
                if any(e["id"] == result["event_id"] for e in events):
                    return True
                await asyncio.sleep(1)
        return False

    assert asyncio.run(find_event())
