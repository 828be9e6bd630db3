"""Curation filters, caps, golden guard, splits, replay, export validation, immutability."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from tuneloop.runtime.settings import CurationSettings, TaskSpec
from tuneloop.services.curation import core as cur
from tuneloop.services.curation.core import Candidate, GoldenIndex, curate, prompt_key, select, split
from tuneloop.services.curation.datasets import DatasetExists, export_jsonl, save_version, validate_jsonl
from tuneloop.services.store.database import AnyStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def cand(i: int, prompt: str = "", **kw: object) -> Candidate:
    fields: dict[str, object] = {
        "event_id": f"e{i}", "occurred_at": T0 + timedelta(seconds=i),
        "messages": [{"role": "system", "content": "route"},
                     {"role": "user", "content": prompt or f"question number {i}"}],
        "prompt": prompt or f"question number {i}", "completion": "card_arrival",
        "rating": 1.0, "correction": None, "label": "card_arrival", "user_id": f"u{i}",
    }
    fields.update(kw)
    return Candidate(**fields)  # type: ignore[arg-type]


def orthogonal(n: int, dim: int = 64) -> np.ndarray:
    return np.eye(n, dim, dtype=np.float32)


def run(cands: list[Candidate], vectors: np.ndarray | None = None,
        golden: GoldenIndex | None = None, **cfg: object) -> cur.CurationResult:
    vecs = orthogonal(len(cands)) if vectors is None else vectors
    return curate(cands, vecs, golden or GoldenIndex(), CurationSettings(**cfg))


def test_select_prefers_correction_then_label_then_positive_answer() -> None:
    corrected = select(cand(1, rating=-1.0, completion="wrong", correction="lost_card"))
    assert not isinstance(corrected, str) and corrected.completion == "lost_card"
    labelled = select(cand(2, rating=None, completion="x", label="top_up"))
    assert not isinstance(labelled, str) and labelled.completion == "top_up"
    positive = select(cand(3, label=None, completion="Here is how."), label_is_answer=False)
    assert not isinstance(positive, str) and positive.messages[-1] == {
        "role": "assistant", "content": "Here is how."}


def test_rated_down_answer_is_never_trained_on_as_is() -> None:
    assert select(cand(1, rating=-1.0, label=None)) == cur.RATED_DOWN
    # The label agrees with the answer the user rejected: still dropped.
    assert select(cand(2, rating=-1.0, completion="card_arrival")) == cur.RATED_DOWN
    assert select(cand(3, rating=None, label=None)) == cur.NOT_SELECTED


def test_each_drop_reason_is_counted() -> None:
    cands = [
        cand(0, rating=-1.0, label=None),                 # rated down
        cand(1, rating=None, label=None),                 # not selected
        cand(2, prompt="   "),                             # empty
        cand(3, prompt="hi"),                              # too short
        cand(4, prompt="x" * 500),                         # too long
        cand(5, prompt="Where is my card?"),               # kept
        cand(6, prompt="where is  MY card?"),              # exact duplicate of 5 (older)
        cand(7, prompt="golden prompt here"),              # golden exact
    ]
    golden = GoldenIndex(keys=frozenset({prompt_key("golden prompt here")}))
    result = run(cands, golden=golden, max_chars=300)
    report = result.report()["dropped"]
    assert report[cur.RATED_DOWN] == 1 and report[cur.NOT_SELECTED] == 1
    assert report[cur.EMPTY] == 1 and report[cur.TOO_SHORT] == 1 and report[cur.TOO_LONG] == 1
    assert report[cur.GOLDEN_EXACT] == 1 and report[cur.DUPLICATE] == 1
    # The newest of two duplicates is the one kept.
    assert [e.source_event_id for e in result.examples] == ["e6"]
    assert result.considered == 8


def test_near_duplicates_and_golden_near_duplicates_are_dropped() -> None:
    cands = [cand(i) for i in range(4)]
    vecs = orthogonal(4)
    vecs[1] = (vecs[0] * 0.99 + vecs[1] * 0.1) / np.linalg.norm([0.99, 0.1])  # near e0
    golden_vec = np.eye(1, 64, 3, dtype=np.float32) * 0.99 + np.eye(1, 64, 10) * 0.05
    golden_vec /= np.linalg.norm(golden_vec)
    result = run(cands, vecs, GoldenIndex(vectors=golden_vec.astype(np.float32)))
    dropped = result.report()["dropped"]
    assert dropped[cur.NEAR_DUPLICATE] == 1
    assert dropped[cur.GOLDEN_NEAR] == 1
    kept = {e.source_event_id for e in result.examples}
    assert "e3" not in kept and len(kept) == 2


def test_golden_event_ids_never_leak() -> None:
    result = run([cand(0), cand(1)], golden=GoldenIndex(event_ids=frozenset({"e1"})))
    assert [e.source_event_id for e in result.examples] == ["e0"]


def test_per_user_and_per_label_caps() -> None:
    cands = [cand(i, user_id="flooder") for i in range(10)] + [
        cand(10 + i, label=f"l{i % 2}") for i in range(10)
    ]
    result = run(cands, per_user_cap=3, per_label_cap=4)
    users = Counter(e.user_id for e in result.examples)
    labels = Counter(e.label for e in result.examples)
    assert users["flooder"] <= 3 and max(labels.values()) <= 4
    dropped = result.report()["dropped"]
    assert dropped[cur.USER_CAP] == 7 and dropped[cur.LABEL_CAP] > 0


def test_pii_is_scrubbed_again() -> None:
    result = run([cand(0, prompt="mail me at jane.doe@example.com please")])
    ex = result.examples[0]
    assert "[EMAIL]" in ex.prompt and "@" not in json.dumps(ex.messages)
    assert result.redactions == 2  # the prompt and its user turn


def test_split_is_stratified_by_label() -> None:
    examples = [
        e for i in range(600)
        if not isinstance(e := select(cand(i, label=f"intent{i % 3}")), str)
    ]
    out = split(examples, CurationSettings())
    for label in ("intent0", "intent1", "intent2"):
        counts = Counter(e.split for e in out if e.label == label)
        assert counts["validation"] in range(6, 15) and counts["test"] in range(6, 15)
        assert counts["train"] >= 170
    assert len(out) == 600 and {e.split for e in out} == {"train", "validation", "test"}
    assert split(examples, CurationSettings()) == out  # deterministic for the seed


def test_replay_mixes_the_configured_share_without_golden() -> None:
    previous = [e for i in range(100) if not isinstance(e := select(cand(100 + i)), str)]
    golden = GoldenIndex(keys=frozenset({prompt_key(previous[0].prompt)}))
    picked = cur.replay(previous, 80, CurationSettings(replay_share=0.2), set(), golden)
    assert len(picked) == 20 and all(e.split == "train" for e in picked)
    assert previous[0].example_id not in {e.example_id for e in picked}


def test_known_labels_keep_a_capped_share_of_train_and_all_held_out_examples() -> None:
    examples = [
        e for i in range(300)
        if not isinstance(e := select(cand(i, label=f"intent{i % 3}")), str)
    ]
    out = split(examples, CurationSettings())
    capped, left_out = cur.cap_known_labels(out, {"intent0", "intent1"}, 10)
    for label in ("intent0", "intent1"):
        assert sum(1 for e in capped if e.label == label and e.split == "train") == 10
    train = [e for e in out if e.split == "train"]
    assert left_out == sum(1 for e in train if e.label != "intent2") - 20
    # The new label keeps all of its train examples, and nothing held out is dropped.
    assert [e for e in capped if e.label == "intent2"] == [e for e in out if e.label == "intent2"]
    assert [e for e in capped if e.split != "train"] == [e for e in out if e.split != "train"]


def test_carry_over_keeps_unlearned_examples_once_with_their_splits() -> None:
    """What a held candidate learned from comes back in the next version: its split kept,
    a prompt the fresh data already has (or an earlier carried one) once, exactly or
    nearly, nothing near a golden prompt, and no label past its cap (unlabelled examples,
    a json or text task's, are never capped)."""
    def example(i: int, split_: str, label: str | None = "new", prompt: str = "") -> cur.Example:
        ex = select(cand(i, prompt, label=label, completion=label or "a reply",
                         correction=None if label else "a reply"),
                    task=None if label else TaskSpec(kind="text"))
        assert not isinstance(ex, str)
        return replace(ex, split=split_)

    fresh = [example(0, "train", prompt="asked again")]
    unlearned = [example(1, "test"), example(2, "train", prompt="asked again"),
                 example(3, "train"), example(4, "train", prompt="question number 3"),
                 example(5, "train"), example(6, "validation", label="other"),
                 example(7, "train")]
    vectors = orthogonal(8)
    vectors[7] = vectors[3]  # e7 says what e3 says in other words
    near = [False, False, False, False, True, False, False]
    kept = cur.carry_over(unlearned, vectors[1:], near, fresh, vectors[:1],
                          CurationSettings(per_label_cap=3))
    assert [(e.source_event_id, e.split) for e in kept] == [("e1", "test"), ("e3", "train"),
                                                            ("e6", "validation")]
    unlimited = cur.carry_over(unlearned, vectors[1:], [False] * 7, fresh, vectors[:1],
                               CurationSettings())
    assert [e.source_event_id for e in unlimited] == ["e1", "e3", "e5", "e6"]
    replies = [example(10 + i, "train", label=None) for i in range(5)]
    assert len(cur.carry_over(replies, orthogonal(5), [False] * 5, [], orthogonal(0),
                              CurationSettings(per_label_cap=1))) == 5


def _record(path: Path, *records: object) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


@pytest.mark.parametrize(
    ("record", "kind"),
    [
        ("not json", "format_error"),
        ({"prompt": "x"}, "missing_messages"),
        ({"messages": [{"role": "user"}]}, "message_missing_key"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "unrecognized_role"),
        ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]},
         "empty_content"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "missing_assistant_message"),
        ({"messages": [{"role": "user", "content": "w " * 50},
                       {"role": "assistant", "content": "a"}]}, "too_many_tokens"),
    ],
)
def test_validator_reports_each_error_kind(tmp_path: Path, record: object, kind: str) -> None:
    path = _record(tmp_path / "bad.jsonl", record)
    report = validate_jsonl(path, "chat", lambda text: len(text.split()), max_tokens=20)
    assert not report.ok and report.errors[kind] == 1 and report.first_lines[kind] == 1


def test_validator_completion_format(tmp_path: Path) -> None:
    path = _record(tmp_path / "c.jsonl", {"prompt": "a"}, {"prompt": "q", "completion": " "},
                   {"prompt": "q", "completion": "a"})
    report = validate_jsonl(path, "completion")
    assert report.errors == Counter({"missing_prompt_or_completion": 1, "empty_content": 1})


def test_export_round_trips_through_the_validator(tmp_path: Path) -> None:
    examples = split([e for i in range(20) if not isinstance(e := select(cand(i)), str)],
                     CurationSettings())
    for fmt in ("chat", "completion"):
        path = export_jsonl(examples, tmp_path / f"x.{fmt}.jsonl", fmt)
        assert validate_jsonl(path, fmt).ok


def test_dataset_versions_are_immutable(tmp_path: Path, any_store: AnyStore) -> None:
    examples = [e for i in range(5) if not isinstance(e := select(cand(i)), str)]
    store = any_store
    with store.connect() as con:
        digest = save_version(con, "ds-0001", examples, [], {}, {})
        with pytest.raises(DatasetExists, match="immutable"):
            save_version(con, "ds-0001", examples[:2], [], {}, {})
        rows = con.execute("SELECT content_hash, n_train FROM datasets").fetchall()
        n = con.execute("SELECT count(*) FROM dataset_examples").fetchall()[0][0]
    assert rows == [(digest, 5)] and n == 5


def test_a_json_target_keeps_its_numbers_and_is_checked_after_the_scrub(tmp_path: Path) -> None:
    schema = tmp_path / "order.schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["order_id"], "properties": {
        "order_id": {"type": "integer"}, "note": {"type": "string"},
        "phone": {"type": "string", "pattern": "^[0-9 +]+$"}}}))
    task = TaskSpec(kind="json", json_schema=schema)
    cands = [cand(0, correction='{"order_id": 123456789, "note": "call +44 20 7946 0958"}'),
             cand(1, correction='{"order_id": 2, "phone": "+44 20 7946 0958"}')]
    result = curate(cands, orthogonal(2), GoldenIndex(), CurationSettings(), task)
    (example,) = result.examples
    # The number stays a number; the phone in a string value is redacted, still JSON.
    assert json.loads(example.completion) == {"order_id": 123456789, "note": "call [PHONE]"}
    assert json.loads(example.messages[-1]["content"])["order_id"] == 123456789
    # A redaction that breaks the schema's pattern leaves the target out, saying why.
    assert result.dropped[cur.INVALID_TARGET] == 1
    (invalid,) = result.invalid_targets
    assert invalid["event_id"] == "e1" and "after PII redaction" in invalid["reason"]


def test_prose_answers_are_redacted_as_before() -> None:
    chosen = select(cand(0, correction="call me on 123456789 or +44 20 7946 0958"))
    assert not isinstance(chosen, str)
    example, count = cur.scrub(chosen)
    assert example.completion == "call me on [PHONE] or [PHONE]" and count == 2
