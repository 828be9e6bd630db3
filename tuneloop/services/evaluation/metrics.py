"""Task metrics over generated answers: one implementation for training and canary.

Pure functions only. The recipe feeds them transformers generations after training
(``tuneloop/training/evaluate.py``); the canary feeds them vLLM generations before a
promotion. Both therefore judge an adapter the same way.

Two kinds of task:
- *labelled* (every reference has a label, e.g. banking77 intent routing): the
  answer is normalised (:func:`normalize_label`) and compared with the label;
  accuracy, macro-F1 (:func:`macro_f1`, the one implementation: the canary's bootstrap
  calls it thousands of times, so it works on integer codes) and a per-label breakdown.
- *free text*: exact match after whitespace and case folding, plus token-level F1
  (SQuAD-style overlap) as the similarity score.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

_SEPARATORS = re.compile(r"[\s\-/]+")
_STRIP = " \t\r\n\"'`.,;:!?()[]{}<>*"


def normalize_label(text: str) -> str:
    """The label an answer names: first line, case-folded, separators as ``_``.

    ``"Card arrival."`` and ``"card_arrival"`` both become ``"card_arrival"``.
    """
    text = unicodedata.normalize("NFKC", text).strip()
    first = text.splitlines()[0] if text else ""
    first = first.strip(_STRIP).casefold()
    return _SEPARATORS.sub("_", first).strip("_")


def normalize_text(text: str) -> str:
    """Whitespace-collapsed, case-folded text for exact match."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall; 1.0 for two empty strings."""
    pred = normalize_text(prediction).split()
    ref = normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class LabelStats:
    """One label's row of the breakdown."""

    support: int
    predicted: int
    correct: int
    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class EvalReport:
    """Metrics of one evaluation; ``accuracy``/``macro_f1`` are None for free text.

    ``kind``, ``score``, ``figures`` and ``per_example`` are set by
    :func:`tuneloop.services.evaluation.tasks.evaluate`: the task kind, its headline
    (macro-F1, field micro-F1 or chrF), its other figures, and each example's score.
    """

    n: int
    exact_match: float
    similarity: float
    accuracy: float | None = None
    macro_f1: float | None = None
    per_label: dict[str, LabelStats] = field(default_factory=dict)
    kind: str | None = None
    score: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    per_example: list[float] = field(default_factory=list)

    @property
    def headline(self) -> float:
        """The number to compare adapters by: accuracy if labelled, else exact match."""
        return self.accuracy if self.accuracy is not None else self.exact_match

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("per_example")  # the paired tests' input, not a figure
        return out


def evaluate_predictions(
    predictions: Sequence[str],
    references: Sequence[str],
    labels: Sequence[str | None] | None = None,
) -> EvalReport:
    """Score ``predictions`` against ``references`` (and ``labels`` when all are set).

    Macro-F1 averages over the labels that occur in the references; a prediction
    naming no known label counts as wrong for its reference label and adds no class.
    Raises ``ValueError`` when the sequences differ in length or are empty.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions for {len(references)} references: pass one "
            "prediction per reference"
        )
    if labels is not None and len(labels) != len(references):
        raise ValueError(f"{len(labels)} labels for {len(references)} references")
    if not references:
        raise ValueError("nothing to evaluate: references is empty")
    n = len(references)
    pairs = list(zip(predictions, references, strict=True))
    exact = sum(normalize_text(p) == normalize_text(r) for p, r in pairs)
    similarity = sum(token_f1(p, r) for p, r in pairs) / n
    from sklearn.metrics import accuracy_score

    if labels is None or any(label is None for label in labels):
        return EvalReport(n=n, exact_match=exact / n, similarity=similarity)
    gold = [normalize_label(str(label)) for label in labels]
    guess = [normalize_label(p) for p in predictions]
    per_label = classification_breakdown(guess, gold)
    accuracy = float(accuracy_score(gold, guess))
    gold_codes, (guess_codes,), names = encode_labels(gold, guess)
    macro = macro_f1(gold_codes, guess_codes, len(names))
    return EvalReport(
        n=n,
        exact_match=exact / n,
        similarity=similarity,
        accuracy=accuracy,
        macro_f1=macro,
        per_label=per_label,
    )


def classification_breakdown(
    predicted: Sequence[str], gold: Sequence[str]
) -> dict[str, LabelStats]:
    """Precision, recall and F1 (scikit-learn's) for every label in ``gold`` (already
    normalised); a predicted label outside ``gold`` counts only as a miss."""
    from sklearn.metrics import multilabel_confusion_matrix, precision_recall_fscore_support

    labels = sorted(set(gold))
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, predicted, labels=labels, average=None, zero_division=0)
    confusion = multilabel_confusion_matrix(gold, predicted, labels=labels)
    return {label: LabelStats(support=int(support[i]),
                              predicted=int(confusion[i][1][1] + confusion[i][0][1]),
                              correct=int(confusion[i][1][1]), precision=float(precision[i]),
                              recall=float(recall[i]), f1=float(f1[i]))
            for i, label in enumerate(labels)}


def encode_labels(gold: Sequence[str], *predictions: Sequence[str]
                  ) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """Integer codes of already-normalised labels, for :func:`macro_f1`.

    ``gold``'s distinct labels, sorted, are ``0 .. k-1`` (the returned names); a
    prediction naming none of them is ``-1``. Returns the gold codes, one code array per
    ``predictions`` argument, and the names.
    """
    names = sorted(set(gold))
    index = {name: i for i, name in enumerate(names)}
    codes = [np.array([index.get(p, -1) for p in pred], dtype=np.int64) for pred in predictions]
    return np.array([index[g] for g in gold], dtype=np.int64), codes, names


def macro_f1(gold: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Macro-F1 over the labels present in ``gold`` (codes from :func:`encode_labels`).

    The same number as scikit-learn's ``f1_score(gold, pred, labels=<labels in gold>,
    average="macro")`` (a unit test holds it to that), computed with three bincounts
    because a bootstrap asks for it thousands of times. Per label
    F1 = 2 TP / (predicted + support); a prediction of ``-1`` is a miss for its gold
    label and adds no class. Raises ``ValueError`` when ``gold`` is empty or the arrays
    differ in length.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} gold labels: pair them")
    if len(gold) == 0:
        raise ValueError("macro-F1 of nothing: gold is empty")
    support = np.bincount(gold, minlength=k)
    tp = np.bincount(gold[gold == pred], minlength=k)
    predicted = np.bincount(pred[pred >= 0], minlength=k)
    present = support > 0
    f1 = 2 * tp[present] / (predicted[present] + support[present])
    return float(f1.mean())
