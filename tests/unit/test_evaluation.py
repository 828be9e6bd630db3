"""Task metrics shared by training and the canary."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuneloop.services.evaluation.metrics import (
    encode_labels,
    evaluate_predictions,
    macro_f1,
    normalize_label,
    token_f1,
)


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("card_arrival", "card_arrival"),
        ("Card arrival.", "card_arrival"),
        ("  'card-arrival'\nbecause ...", "card_arrival"),
        ("CARD_ARRIVAL!", "card_arrival"),
        ("", ""),
    ],
)
def test_normalize_label(answer: str, label: str) -> None:
    assert normalize_label(answer) == label


def test_accuracy_macro_f1_and_per_label() -> None:
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "nonsense", "c"]
    report = evaluate_predictions(pred, gold, gold)
    assert report.n == 6
    assert report.accuracy == pytest.approx(4 / 6)
    a, b, c = report.per_label["a"], report.per_label["b"], report.per_label["c"]
    assert (a.support, a.predicted, a.correct) == (3, 2, 2)
    assert a.precision == 1.0 and a.recall == pytest.approx(2 / 3) and a.f1 == pytest.approx(0.8)
    assert b.precision == 0.5 and b.recall == 0.5 and b.f1 == 0.5
    assert c.f1 == 1.0
    # Macro over the reference labels only: the invalid answer adds no class.
    assert report.macro_f1 == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert report.headline == report.accuracy
    assert "nonsense" not in report.per_label


def test_macro_f1_matches_scikit_learn_on_reference_labels() -> None:
    from sklearn.metrics import f1_score

    gold = ["x", "y", "z", "x", "y", "z", "x"]
    pred = ["x", "z", "z", "y", "y", "x", "x"]
    report = evaluate_predictions(pred, gold, gold)
    expected = f1_score(gold, pred, labels=["x", "y", "z"], average="macro")
    assert report.macro_f1 == pytest.approx(expected)


# Labels a gold sequence may hold, and answers that also name labels outside it.
_GOLD = st.sampled_from(["a", "b", "c", "d", "e"])
_ANSWER = st.sampled_from(["a", "b", "c", "d", "e", "x", "y"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_GOLD, _ANSWER), min_size=1, max_size=40), st.data())
def test_the_fast_macro_f1_is_scikit_learns(pairs: list[tuple[str, str]],
                                             data: st.DataObject) -> None:
    """The bincount macro-F1 the bootstrap calls equals f1_score(average="macro") over
    the labels in the references, on every sample and on every resample of it."""
    from sklearn.metrics import f1_score

    gold, pred = [g for g, _ in pairs], [p for _, p in pairs]
    codes, (guess,), names = encode_labels(gold, pred)
    expected = f1_score(gold, pred, labels=names, average="macro", zero_division=0)
    assert macro_f1(codes, guess, len(names)) == pytest.approx(expected)
    assert evaluate_predictions(pred, gold, gold).macro_f1 == pytest.approx(expected)
    # A bootstrap resample keeps the full label coding; labels it lost drop out.
    idx = np.array(data.draw(st.lists(st.integers(0, len(gold) - 1), min_size=1,
                                      max_size=len(gold))))
    kept = sorted({gold[i] for i in idx})
    resampled = f1_score([gold[i] for i in idx], [pred[i] for i in idx], labels=kept,
                         average="macro", zero_division=0)
    assert macro_f1(codes[idx], guess[idx], len(names)) == pytest.approx(resampled)


def test_macro_f1_refuses_what_it_cannot_score() -> None:
    with pytest.raises(ValueError, match="pair them"):
        macro_f1(np.array([0, 1]), np.array([0]), 2)
    with pytest.raises(ValueError, match="empty"):
        macro_f1(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 0)


def test_free_text_exact_match_and_similarity() -> None:
    report = evaluate_predictions(["Hello  World", "the cat sat", "x"],
                                  ["hello world", "the cat sat down", "y"])
    assert report.accuracy is None and report.macro_f1 is None and not report.per_label
    assert report.exact_match == pytest.approx(1 / 3)
    assert report.similarity == pytest.approx((1.0 + token_f1("the cat sat", "the cat sat down")
                                               + 0.0) / 3)
    assert report.headline == report.exact_match


def test_token_f1() -> None:
    assert token_f1("a b c", "a b c") == 1.0
    assert token_f1("a b", "c d") == 0.0
    assert token_f1("a b", "a b c d") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert token_f1("", "") == 1.0


def test_errors_name_the_mismatch() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        evaluate_predictions(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        evaluate_predictions([], [])
