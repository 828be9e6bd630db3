"""Drift math on synthetic data: MMD, classifier AUC, the combined decision, cluster report."""

from __future__ import annotations

import numpy as np
import pytest

from services.clusters import what_drifted
from services.drift import auc_with_permutations, classifier_test, detect_drift, mmd_test
from services.settings import DriftSettings


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
    from services.drift import KERNEL_SCALES

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


def test_detect_drift_decision_and_score() -> None:
    cfg = DriftSettings(permutations=200, max_points=300)
    quiet = detect_drift(_unit(_gauss(300, seed=1)), _unit(_gauss(200, seed=2)), cfg)
    loud = detect_drift(_unit(_gauss(300, seed=1)), _unit(_gauss(200, shift=1.5, seed=2)), cfg)
    assert not quiet.drifted and quiet.p_value > cfg.alpha
    assert loud.drifted and loud.p_value < cfg.alpha
    assert 0 <= quiet.score < loud.score <= 1
    assert "DRIFT" in loud.summary()


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
