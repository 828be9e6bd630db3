"""Evaluation per task kind: one implementation for the training report, the offline gate
and the nightly check.

:func:`evaluate` scores answers against references the way the task's kind asks, and
returns an :class:`~tuneloop.services.evaluation.metrics.EvalReport` whose ``score`` is
the kind's headline and ``per_example`` the score each paired test resamples:

- ``label``: macro-F1 (headline) and accuracy; an example scores 1 when its label is right.
- ``json``: parse rate, schema-valid rate, exact match per field, field-level micro-F1
  and whole-object exact match. An example scores its own field F1 (0 when it does not
  parse); the headline is their mean. Nested objects are compared field by field under
  dotted names (``address.city``); a list is one value.
- ``text``: chrF (sacrebleu, on 0-1) and ROUGE-L (rouge-score) against the reference,
  and, given an embedding function, the cosine similarity of answer and reference. An
  example scores its sentence chrF; the headline is their mean.

The headline is the mean of what the paired bootstrap resamples (for ``label``, the
macro-F1 it recomputes), so the offline gate, the training report and the nightly check
speak of the same number.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from tuneloop.services.evaluation.metrics import (
    EvalReport,
    evaluate_predictions,
    normalize_label,
    normalize_text,
)

Embed = Callable[[list[str]], np.ndarray]
# What each kind's headline score is, as decisions and reports name it.
SCORE_NAMES = {"label": "macro-F1", "json": "field F1", "text": "chrF"}
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)


# ------------------------------------------------------------------------ json
def parse_object(answer: str) -> dict[str, Any] | None:
    """The JSON object an answer holds, or None when it holds none.

    The whole answer must be one JSON object; a Markdown code fence around it (```json
    ... ```), which chat models add by habit, is the only thing taken away.
    """
    text = answer.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``: the fields an object is judged by."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal field values; strings compared case- and whitespace-insensitively."""
    if isinstance(a, str) and isinstance(b, str):
        return normalize_text(a) == normalize_text(b)
    return bool(a == b) and type(a) is type(b)


@lru_cache(maxsize=16)
def _validator(schema_json: str) -> Any:
    from jsonschema.validators import validator_for

    schema = json.loads(schema_json)
    return validator_for(schema)(schema)


def schema_errors(obj: Any, schema: Mapping[str, Any]) -> list[str]:
    """Why ``obj`` does not satisfy ``schema`` (jsonschema's messages); empty when it does."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            for e in validator.iter_errors(obj)]


@dataclass(frozen=True)
class ObjectScore:
    """One answer against its reference object."""

    parsed: bool
    valid: bool
    matched: int  # fields present in both with the same value
    predicted: int  # fields in the answer
    expected: int  # fields in the reference
    fields_right: dict[str, bool]  # each reference field: did the answer get it

    @property
    def f1(self) -> float:
        if not self.parsed:
            return 0.0
        if self.predicted == 0 and self.expected == 0:
            return 1.0
        return 2 * self.matched / (self.predicted + self.expected)

    @property
    def exact(self) -> bool:
        return self.parsed and self.matched == self.predicted == self.expected


def score_object(answer: str, reference: Mapping[str, Any],
                 schema: Mapping[str, Any] | None) -> ObjectScore:
    """Parse ``answer``, check it against ``schema`` and compare it with ``reference``
    field by field."""
    expected = flatten(reference)
    got = parse_object(answer)
    if got is None:
        return ObjectScore(False, False, 0, 0, len(expected), {f: False for f in expected})
    valid = not schema_errors(got, schema) if schema is not None else True
    predicted = flatten(got)
    right = {f: f in predicted and _same(predicted[f], v) for f, v in expected.items()}
    return ObjectScore(True, valid, sum(right.values()), len(predicted), len(expected), right)


def reference_object(reference: str) -> dict[str, Any]:
    """A json example's reference as an object; raises ``ValueError`` when it is not one
    (curation keeps only targets that parse and satisfy the schema)."""
    obj = parse_object(reference)
    if obj is None:
        raise ValueError(f"the reference {reference[:80]!r} is not a JSON object")
    return obj


def evaluate_json(predictions: Sequence[str], references: Sequence[str],
                  schema: Mapping[str, Any] | None) -> EvalReport:
    """Parse rate, schema-valid rate, exact match per field, field micro-F1 and whole-object
    exact match of ``predictions`` against reference objects."""
    base = evaluate_predictions(predictions, references)
    scores = [score_object(p, reference_object(r), schema)
              for p, r in zip(predictions, references, strict=True)]
    n = len(scores)
    per_field: dict[str, list[bool]] = {}
    for s in scores:
        for name, ok in s.fields_right.items():
            per_field.setdefault(name, []).append(ok)
    matched = sum(s.matched for s in scores)
    denominator = sum(s.predicted + s.expected for s in scores)
    micro = 2 * matched / denominator if denominator else 1.0
    figures = {
        "parse_rate": sum(s.parsed for s in scores) / n,
        "schema_valid_rate": sum(s.valid for s in scores) / n,
        "field_micro_f1": micro,
        "object_exact_match": sum(s.exact for s in scores) / n,
        "field_exact_match": {name: {"support": len(oks), "exact_match": sum(oks) / len(oks)}
                              for name, oks in sorted(per_field.items())},
    }
    return EvalReport(n=n, exact_match=base.exact_match, similarity=base.similarity,
                      kind="json", score=float(np.mean([s.f1 for s in scores])),
                      figures=figures,
                      per_example=[s.f1 for s in scores])


# ------------------------------------------------------------------------ text
class _Words:
    """ROUGE's tokenizer for any script: case-folded words (rouge-score's own keeps only
    ASCII letters and digits, so a reply in Greek or Hindi would score 0)."""

    def tokenize(self, text: str) -> list[str]:
        return unicodedata.normalize("NFKC", text).casefold().split()


def chrf(prediction: str, reference: str) -> float:
    """Sentence chrF (sacrebleu) of one answer, on 0-1."""
    import sacrebleu

    return float(sacrebleu.sentence_chrf(prediction, [reference]).score) / 100


def evaluate_text(predictions: Sequence[str], references: Sequence[str],
                  embed: Embed | None = None) -> EvalReport:
    """Mean sentence chrF (the headline), corpus chrF and ROUGE-L against the references,
    and the mean cosine similarity of answer and reference embeddings given ``embed``."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    base = evaluate_predictions(predictions, references)
    corpus = float(CHRF().corpus_score(list(predictions), [list(references)]).score) / 100
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())
    rouge = [scorer.score(r, p)["rougeL"].fmeasure
             for p, r in zip(predictions, references, strict=True)]
    per_example = [chrf(p, r) for p, r in zip(predictions, references, strict=True)]
    figures: dict[str, Any] = {"chrf": corpus, "rouge_l": float(np.mean(rouge))}
    if embed is not None:
        figures["cosine"] = mean_cosine(embed, predictions, references)
    return EvalReport(n=len(per_example), exact_match=base.exact_match,
                      similarity=base.similarity, kind="text",
                      score=float(np.mean(per_example)), figures=figures,
                      per_example=per_example)


def mean_cosine(embed: Embed, predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean cosine similarity of each answer's embedding with its reference's."""
    vectors = np.asarray(embed(list(predictions) + list(references)), dtype=np.float64)
    a, b = vectors[: len(predictions)], vectors[len(predictions):]
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1), 0.0)
    return float(cos.mean())


# ------------------------------------------------------------------------ all kinds
def evaluate(kind: str, predictions: Sequence[str], references: Sequence[str],
             labels: Sequence[str | None] | None = None, *,
             schema: Mapping[str, Any] | None = None, embed: Embed | None = None) -> EvalReport:
    """Score ``predictions`` the way a task of ``kind`` is judged (see the module).

    A ``label`` task whose examples lack labels is judged as free text by exact match.
    Raises ``ValueError`` for an unknown kind, sequences of different lengths, no
    examples, or (``json``) a reference that is not a JSON object.
    """
    if kind == "json":
        return evaluate_json(predictions, references, schema)
    if kind == "text":
        return evaluate_text(predictions, references, embed)
    if kind != "label":
        raise ValueError(f"unknown task kind {kind!r}: use label, json or text")
    report = evaluate_predictions(predictions, references, labels)
    if report.macro_f1 is None:
        right = [float(normalize_text(p) == normalize_text(r))
                 for p, r in zip(predictions, references, strict=True)]
        return EvalReport(report.n, report.exact_match, report.similarity, kind="label",
                          score=report.exact_match, per_example=right)
    gold = [normalize_label(str(label)) for label in labels or []]
    right = [float(normalize_label(p) == g) for p, g in zip(predictions, gold, strict=True)]
    return EvalReport(report.n, report.exact_match, report.similarity, report.accuracy,
                      report.macro_f1, report.per_label, kind="label", score=report.macro_f1,
                      per_example=right)
