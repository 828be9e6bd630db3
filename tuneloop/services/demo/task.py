"""What the demo and ``bench canary --task`` need to know about the served task's kind, pure
apart from reading a data folder.

- :func:`spec_table`: the ``[tasks.<alias>]`` table of a ``json`` or ``text`` demo (the
  schema comes with the data folder, or is derived from its targets).
- :func:`load_queries`: a task-data folder as :class:`Query` lists, the group in
  ``intent`` and the answer to learn in ``target``.
- :class:`DemoTask`: how a simulated user asks and judges, and how the demo scores the
  alias's answers to held-out queries, per kind.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.runtime.settings import TaskSpec
from tuneloop.services.demo.banking77 import Query
from tuneloop.services.demo.task_data import derive_schema, group_sizes, load_rows
from tuneloop.services.evaluation.tasks import (
    evaluate,
    reference_object,
    score_object,
)

SYSTEM_PROMPTS = {
    "json": "Extract the details of the user's message as one JSON object, with only the "
            "fields the message gives. Answer with the object alone.",
    "text": "You are a helpful assistant. Reply to the user's last message in one or two "
            "sentences.",
}
ANSWER_TOKENS = 64  # the demo's and the bench's answer budget for json and text
# A simulated user's taste, not a setting of the loop: a reply this close to the
# reference (sentence chrF, 0-1) is a right one.
TEXT_RIGHT_CHRF = 0.5
# The headline score of each kind in the demo's before/after tables and FIGURE lines.
HEADLINES = {"label": "macro_f1", "json": "field_exact", "text": "chrf"}


def spec_table(kind: str, folder: Path, home: Path) -> dict[str, Any]:
    """The task spec of a ``json`` or ``text`` alias served on ``folder``'s data: the kind,
    system prompt and answer budget, and for ``json`` the folder's ``schema.json`` or,
    when it has none, the schema its targets satisfy (written to ``home/schema.json``).
    Raises ``ValueError`` for another kind, and for a folder whose ``schema.json``
    refuses one of its targets (the first few named, with the schema's reason)."""
    if kind not in SYSTEM_PROMPTS:
        raise ValueError(f"task kind {kind!r}: use json or text")
    spec: dict[str, Any] = {"kind": kind, "system_prompt": SYSTEM_PROMPTS[kind],
                            "answer_tokens": ANSWER_TOKENS}
    if kind == "json":
        schema = Path(folder) / "schema.json"
        if schema.exists():
            check_targets(folder, schema)
        else:
            schema = Path(home) / "schema.json"
            schema.write_text(json.dumps(derive_schema(
                [r.target for r in load_rows(folder, "train")]), indent=2))
        spec["json_schema"] = str(schema)
    return spec


def check_targets(folder: Path, schema: Path, show: int = 3) -> None:
    """Raise ``ValueError`` when ``schema`` is not a JSON Schema (settings' own check) or
    a train or test target of ``folder`` is not an object it accepts, as curation judges
    a target: the demo would teach and judge against answers its own schema refuses."""
    from tuneloop.services.curation.core import target_problem

    task = TaskSpec(kind="json", json_schema=schema)
    bad = [f"{split}.csv row {i}: {why}" for split in ("train", "test")
           for i, row in enumerate(load_rows(folder, split), start=1)
           if (why := target_problem(row.target, task)) is not None]
    if bad:
        raise ValueError(f"{len(bad)} target(s) are not objects schema.json accepts "
                         f"({'; '.join(bad[:show])}); fix the rows or the schema")


def load_queries(folder: Path, heldout: int, min_rows: int, seed: int = 0
                 ) -> tuple[list[str], list[Query], list[Query]]:
    """The groups with at least ``min_rows`` train rows of their own, and the train and
    held-out queries of those groups (rows of one group only).

    Held-out queries come from the test split where a group has ``heldout`` test rows;
    a group with fewer (a dataset whose test split holds other groups) has its last
    ``heldout`` train rows, in a seeded order, held out instead and never sent as
    traffic; a train query whose text is held out is left out. Raises
    ``FileNotFoundError`` or ``ValueError`` as :func:`load_rows` does.
    """
    train = [r for r in load_rows(folder, "train") if len(r.groups) == 1]
    test = [r for r in load_rows(folder, "test") if len(r.groups) == 1]
    random.Random(seed).shuffle(train)
    sizes, test_sizes = group_sizes(train), group_sizes(test)
    groups = sorted(g for g, k in sizes.items() if k >= min_rows)
    train_q: list[Query] = []
    test_q: list[Query] = []
    for g in groups:
        mine = [Query(r.text, g, r.target) for r in train if r.groups == (g,)]
        if test_sizes.get(g, 0) >= heldout:
            train_q += mine
            test_q += [Query(r.text, g, r.target) for r in test if r.groups == (g,)]
        else:
            train_q += mine[:-heldout]
            test_q += mine[-heldout:]
    held = {q.text for q in test_q}  # a query in both splits is never traffic
    return groups, [q for q in train_q if q.text not in held], test_q


@dataclass(frozen=True)
class DemoTask:
    """The served task as the demo's users and its before/after figures see it."""

    spec: TaskSpec

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def headline(self) -> str:
        return HEADLINES[self.kind]

    @property
    def answer_tokens(self) -> int:
        return self.spec.max_answer_tokens

    def chat(self, q: Query) -> list[dict[str, str]]:
        """The chat a user sends: the query alone (the gateway adds the task's system
        prompt)."""
        return [{"role": "user", "content": q.text}]

    def right(self, answer: str, q: Query) -> bool:
        """A user's verdict: the right intent; the whole object; a reply within
        :data:`TEXT_RIGHT_CHRF` of the reference."""
        if self.kind == "json":
            return score_object(answer, reference_object(q.answer),
                                self.spec.schema_document).exact
        if self.kind == "text":
            return bool(evaluate("text", [answer], [q.answer]).per_example[0] >= TEXT_RIGHT_CHRF)
        from tuneloop.services.evaluation.metrics import normalize_label

        return normalize_label(answer) == normalize_label(q.answer)

    def per_example(self, answers: Sequence[str], queries: Sequence[Query]) -> list[float]:
        """Each answer's headline score: the share of the reference's fields it got
        exactly (``json``; an empty reference: 1 when the answer is an empty object) or its
        sentence chrF (``text``). Not for ``label``, whose macro-F1 is no mean."""
        if self.kind == "json":
            scores = [score_object(a, reference_object(q.answer), self.spec.schema_document)
                      for a, q in zip(answers, queries, strict=True)]
            return [s.matched / s.expected if s.expected else float(s.exact) for s in scores]
        if self.kind == "text":
            return evaluate("text", answers, [q.answer for q in queries]).per_example
        raise ValueError("a label task's headline (macro-F1) is not a mean over examples")

    def scores(self, answers: Sequence[str], queries: Sequence[Query]) -> dict[str, float]:
        """The kind's figures of ``answers`` to ``queries``, the headline among them."""
        refs = [q.answer for q in queries]
        if self.kind == "json":
            report = evaluate("json", answers, refs, schema=self.spec.schema_document)
            f = report.figures
            return {"field_exact": _mean(self.per_example(answers, queries)),
                    "field_f1": f["field_micro_f1"], "object_exact": f["object_exact_match"],
                    "parse_rate": f["parse_rate"], "schema_valid": f["schema_valid_rate"]}
        if self.kind == "text":
            report = evaluate("text", answers, refs)
            return {"chrf": report.score or 0.0, "rouge_l": report.figures["rouge_l"]}
        from tuneloop.services.demo.result import scores

        return scores(answers, queries)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
