"""Task kinds: the spec, evaluation per kind, the offline gate per kind, curation per kind."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from pydantic import ValidationError

from tuneloop.runtime.settings import CanarySettings, CurationSettings, TaskSpec, load_settings
from tuneloop.services.canary.core import (
    FAIL,
    HOLD,
    INFO,
    PASS,
    Paired,
    combine,
    golden_checks,
    improvement_checks,
)
from tuneloop.services.curation import core as cur
from tuneloop.services.curation.core import Candidate, GoldenIndex, curate, select
from tuneloop.services.evaluation.tasks import evaluate, parse_object

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"},
                                           "guests": {"type": "integer", "minimum": 1}},
          "required": ["city"], "additionalProperties": False}


@pytest.fixture
def schema_file(tmp_path: Path) -> Path:
    path = tmp_path / "booking.schema.json"
    path.write_text(json.dumps(SCHEMA))
    return path


def json_task(schema_file: Path, **kw: object) -> TaskSpec:
    return TaskSpec(kind="json", json_schema=schema_file, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the spec
def test_a_json_task_needs_a_readable_valid_schema(tmp_path: Path, schema_file: Path) -> None:
    with pytest.raises(ValidationError, match="a json task needs json_schema"):
        TaskSpec(kind="json")
    with pytest.raises(ValidationError, match="cannot read it"):
        TaskSpec(kind="json", json_schema=tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValidationError, match="is not JSON"):
        TaskSpec(kind="json", json_schema=tmp_path / "broken.json")
    (tmp_path / "bad.json").write_text(json.dumps({"type": "objekt"}))
    with pytest.raises(ValidationError, match="not a valid JSON Schema at type"):
        TaskSpec(kind="json", json_schema=tmp_path / "bad.json")
    with pytest.raises(ValidationError, match="only a json task has a schema"):
        TaskSpec(kind="text", json_schema=schema_file)
    with pytest.raises(ValidationError, match="'label', 'json' or 'text'"):
        TaskSpec(kind="regression")  # type: ignore[arg-type]
    spec = json_task(schema_file)
    assert spec.schema_document == SCHEMA and spec.describe()["schema"] == SCHEMA


def test_each_kind_has_its_answer_budget_unless_the_spec_names_one() -> None:
    assert [TaskSpec(kind=k).max_answer_tokens for k in ("label", "text")] == [16, 96]
    assert TaskSpec(kind="text", answer_tokens=200).max_answer_tokens == 200


def test_settings_give_the_served_alias_its_task_and_refuse_a_task_of_no_alias(
        schema_file: Path) -> None:
    assert load_settings().task.kind == "label"
    settings = load_settings({"tasks.support-bot.kind": "json",
                              "tasks.support-bot.json_schema": str(schema_file)})
    assert settings.task.kind == "json" and settings.task.max_answer_tokens == 128
    with pytest.raises(ValidationError, match="tasks.other: no alias of that name is served"):
        load_settings({"tasks.other.kind": "text"})
    with pytest.raises(ValueError, match="did you mean 'tasks.support-bot.kind'"):
        load_settings({"tasks.support-bot.kinds": "text"})


def test_a_relative_schema_path_is_read_beside_the_settings_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process started in another folder (each role of `tuneloop up --split` runs in its
    own home) reads the schema the operator's file names beside it."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "slots.schema.json").write_text(json.dumps(SCHEMA))
    (conf / "tuneloop.toml").write_text(
        '[tasks.support-bot]\nkind = "json"\njson_schema = "slots.schema.json"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("TUNELOOP_CONFIG", str(conf / "tuneloop.toml"))
    task = load_settings().task
    assert task.json_schema == (conf / "slots.schema.json").resolve()
    assert task.schema_document == SCHEMA
    # Not beside the file: the working directory, as before.
    (elsewhere / "other.schema.json").write_text(json.dumps(SCHEMA))
    spec = TaskSpec(kind="json", json_schema=Path("other.schema.json"))
    assert spec.json_schema == Path("other.schema.json") and spec.schema_document == SCHEMA


# ------------------------------------------------------------------ evaluation
def test_json_answers_are_judged_by_parse_schema_fields_and_whole_objects() -> None:
    refs = ['{"city": "Paris", "guests": 2}', '{"city": "Rome", "guests": 1}',
            '{"city": "Oslo"}', '{"city": "Lima", "guests": 3}']
    answers = ['{"city": "paris", "guests": 2}',  # right (strings compare case-folded)
               '```json\n{"city": "Rome"}\n```',  # fenced, one field of two
               'Oslo, I think',  # not JSON
               '{"city": "Lima", "guests": 0}']  # parses, breaks the schema's minimum
    report = evaluate("json", answers, refs, schema=SCHEMA)
    f = report.figures
    assert f["parse_rate"] == 0.75 and f["schema_valid_rate"] == 0.5
    assert f["object_exact_match"] == 0.25
    assert f["field_exact_match"]["city"] == {"support": 4, "exact_match": 0.75}
    assert f["field_exact_match"]["guests"] == {"support": 3, "exact_match": 1 / 3}
    # matched 2 + 1 + 0 + 1 fields; predicted 2 + 1 + 0 + 2, expected 2 + 2 + 1 + 2
    assert f["field_micro_f1"] == pytest.approx(2 * 4 / (5 + 7))
    assert report.per_example == pytest.approx([1.0, 2 / 3, 0.0, 0.5])
    assert report.score == pytest.approx(np.mean([1.0, 2 / 3, 0.0, 0.5]))
    assert parse_object("[1, 2]") is None and parse_object(' {"a": {"b": 1}} ') == {"a": {"b": 1}}


def test_text_answers_are_judged_by_chrf_and_rouge_l_in_any_script() -> None:
    refs = ["Your card will arrive within five working days.", "Το τραπέζι είναι έτοιμο."]
    answers = ["The card arrives in five working days.", "Το τραπέζι είναι έτοιμο."]
    report = evaluate("text", answers, refs)
    expected = sacrebleu.corpus_chrf(answers, [refs]).score / 100
    assert report.figures["chrf"] == pytest.approx(expected)
    assert report.per_example[1] == pytest.approx(1.0) and 0 < report.per_example[0] < 1
    # ROUGE-L of the identical Greek reply is 1: words of every script count.
    assert 0.5 < report.figures["rouge_l"] < 1
    letters = "abcdefghijklmnopqrstuvwxyzαβγδεζηθικλμνξοπρστυφχψω"

    def embed(texts: list[str]) -> np.ndarray:  # letter counts: a transparent stand-in vector
        return np.array([[t.casefold().count(c) for c in letters] for t in texts], dtype=float)

    assert evaluate("text", answers[1:], refs[1:], embed=embed).figures["cosine"] == pytest.approx(1.0)


# ------------------------------------------------------------------ the gate
CFG = CanarySettings(bootstrap_resamples=500)
REPLIES = [f"Your order number {i} ships on day {i % 7} to the address on file." for i in range(60)]


def text_pairs(candidate_good: bool, n: int = 60) -> Paired:
    rng = random.Random(0)
    refs = REPLIES[:n]
    vague = [f"Thanks for reaching out about item {rng.randint(0, 99)}." for _ in refs]
    near = [r.replace("ships", "will ship") for r in refs]
    incumbent = [v if i % 3 else near[i] for i, v in enumerate(vague)]
    candidate = near if candidate_good else vague
    return Paired(refs, [None] * n, incumbent, candidate, kind="text")


def test_text_candidates_are_gated_on_chrf_not_on_exact_words() -> None:
    good = text_pairs(candidate_good=True)
    assert not any(good.right(good.candidate))  # no answer is word for word the reference
    golden, figures = golden_checks(good, CFG)
    assert combine(golden) == "pass" and figures["golden_score"]["metric"] == "chrF"
    checks, test_figures = improvement_checks(good, CFG)
    assert checks[0].outcome == PASS and "chrF" in checks[0].name
    assert test_figures["test_score"]["candidate"] > test_figures["test_score"]["incumbent"]
    bad = text_pairs(candidate_good=False)
    assert combine(golden_checks(bad, CFG)[0]) == "reject"
    assert improvement_checks(bad, CFG)[0][0].outcome == FAIL


def json_pairs(candidate: str, n: int = 40) -> Paired:
    refs = [json.dumps({"city": f"City{i}", "guests": i % 4 + 1}) for i in range(n)]
    incumbent = [json.dumps({"city": f"City{i}"}) for i in range(n)]  # half the fields
    answers = {
        "better": refs,
        "invalid": [json.dumps({"city": f"City{i}", "guests": 0}) if i % 2 else r
                    for i, r in enumerate(refs)],
    }[candidate]
    return Paired(refs, [None] * n, incumbent, answers, kind="json", schema=SCHEMA)


def test_json_candidates_must_keep_the_schema_and_improve_whole_objects() -> None:
    better = json_pairs("better")
    golden, figures = golden_checks(better, CFG)
    assert combine(golden) == "pass" and figures["golden_schema_valid"]["candidate"] == 1.0
    checks, _ = improvement_checks(better, CFG)
    # Field F1 decides (paired bootstrap); whole objects are reported; the schema holds.
    assert [c.outcome for c in checks] == [PASS, INFO, PASS]
    assert "field F1" in checks[0].name and "paired bootstrap" in checks[0].name
    assert "whole-object exact match 0.000 -> 1.000" in checks[1].detail
    # Half the answers break the schema (guests 0): its check fails, whatever the fields say.
    invalid = json_pairs("invalid")
    golden, _ = golden_checks(invalid, CFG)
    failed = [c.name for c in golden if c.outcome == FAIL]
    assert failed == ["golden schema-valid (McNemar)"]


def test_a_text_candidate_better_on_some_answers_and_worse_on_others_holds() -> None:
    refs = REPLIES[:8]
    changed = [r.replace("file", "record") if i % 2 else r.replace("ships", "is shipping")
               for i, r in enumerate(refs)]
    incumbent = [c if i % 2 else r for i, (r, c) in enumerate(zip(refs, changed, strict=True))]
    candidate = [r if i % 2 else c for i, (r, c) in enumerate(zip(refs, changed, strict=True))]
    checks, _ = improvement_checks(Paired(refs, [None] * 8, incumbent, candidate, kind="text"), CFG)
    assert checks[0].outcome == HOLD and checks[0].detail.endswith("inconclusive")


# ------------------------------------------------------------------ curation
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def cand(i: int, **kw: object) -> Candidate:
    fields: dict[str, object] = {
        "event_id": f"e{i}", "occurred_at": T0 + timedelta(seconds=i),
        "messages": [{"role": "user", "content": f"book a table number {i}"}],
        "prompt": f"book a table number {i}", "completion": "", "rating": None,
        "correction": None, "label": None, "user_id": f"u{i}"}
    fields.update(kw)
    return Candidate(**fields)  # type: ignore[arg-type]


def test_json_targets_must_satisfy_the_schema_and_are_kept_in_one_form(schema_file: Path) -> None:
    task = json_task(schema_file, system_prompt="Extract the booking as JSON.")
    kept = select(cand(1, correction='{"city":"Paris",  "guests":2}'), task=task)
    assert not isinstance(kept, str)
    assert kept.completion == '{"city": "Paris", "guests": 2}'
    assert kept.messages[0] == {"role": "system", "content": "Extract the booking as JSON."}
    labelled = select(cand(2, label='{"city": "Rome"}'), task=task)
    assert not isinstance(labelled, str) and json.loads(labelled.completion) == {"city": "Rome"}
    candidates = [cand(3, correction='{"guests": 2}'), cand(4, correction="Paris, 2 people"),
                  cand(5, correction='{"city": "Oslo"}')]
    result = curate(candidates, np.eye(3, 8, dtype=np.float32), GoldenIndex(),
                    CurationSettings(), task)
    report = result.report()
    assert report["kept"] == 1 and report["dropped"][cur.INVALID_TARGET] == 2
    reasons = {r["event_id"]: r["reason"] for r in report["invalid_targets"]}
    assert reasons == {"e3": "(root): 'city' is a required property", "e4": "not a JSON object"}


def test_text_targets_are_corrections_and_well_rated_answers_never_labels() -> None:
    task = TaskSpec(kind="text", target_min_rating=0.5)
    corrected = select(cand(1, completion="meh", rating=-1.0, correction="A table for two."),
                       task=task)
    assert not isinstance(corrected, str) and corrected.completion == "A table for two."
    liked = select(cand(2, completion="Booked for 8pm.", rating=1.0), task=task)
    assert not isinstance(liked, str) and liked.completion == "Booked for 8pm."
    assert select(cand(3, completion="Booked.", rating=0.2), task=task) == cur.RATED_LOW
    assert select(cand(4, completion="Booked.", rating=-1.0), task=task) == cur.RATED_DOWN
    # A label names the reply's topic; it is never the reply to learn.
    assert select(cand(5, completion="Booked.", label="Restaurants_1"), task=task) == \
        cur.NOT_SELECTED


# ------------------------------------------------------------------ task data
def test_task_data_reads_any_folder_of_the_layout_and_derives_a_schema(tmp_path: Path) -> None:
    from jsonschema import Draft202012Validator

    from tuneloop.services.demo.task_data import bundled, derive_schema, group_sizes, load_rows

    (tmp_path / "train.csv").write_text(
        'text,target,services\nhi,"{""a"": ""x"", ""b"": [""y"", ""z""]}","S_1,S_2"\n'
        'yo,"{""a"": ""w""}",S_1\n')
    rows = load_rows(tmp_path, "train")
    assert rows[0].groups == ("S_1", "S_2") and group_sizes(rows) == {"S_1": 2, "S_2": 1}
    schema = derive_schema([r.target for r in rows])
    assert schema["properties"] == {"a": {"type": "string"},
                                    "b": {"type": "array", "items": {"type": "string"}}}
    validator = Draft202012Validator(schema)
    assert validator.is_valid({"a": "q"}) and not validator.is_valid({"c": "q"})
    (tmp_path / "test.csv").write_text("text,answer\nhi,there\n")
    with pytest.raises(ValueError, match="the layout is text, target and one column"):
        load_rows(tmp_path, "test")
    snips = json.loads((bundled("snips") / "schema.json").read_text())
    every = [r.target for r in load_rows(bundled("snips"), "test")]
    assert all(Draft202012Validator(snips).is_valid(json.loads(t)) for t in every)


# ------------------------------------------------------------------ the judge
def test_a_pair_is_won_only_when_both_orders_agree() -> None:
    from tuneloop.services.canary.judge import LOSS, TIE, WIN, pair_outcome, parse_verdict

    assert [parse_verdict(r) for r in ("A", " b.", "Tie", "It is a tie.", "Reply B is better",
                                       "neither", "")] == ["A", "B", "tie", "tie", "B", None, None]
    assert pair_outcome("A", "B") == WIN and pair_outcome("B", "A") == LOSS
    # Position bias (A both times), a tie or an unreadable verdict: no evidence either way.
    assert {pair_outcome("A", "A"), pair_outcome("tie", "B"), pair_outcome(None, "B")} == {TIE}


def test_the_judge_decides_a_text_improvement_by_a_sign_test() -> None:
    from tuneloop.services.canary.judge import Judged, decide_with_judge, judge_messages

    def judged(wins: int, losses: int, ties: int) -> Judged:
        outcomes = ["win"] * wins + ["loss"] * losses + ["tie"] * ties
        return Judged("judge-7b", [{"index": i, "candidate_first": None,
                                    "candidate_second": None, "outcome": o}
                                   for i, o in enumerate(outcomes)])

    reference_checks, _ = improvement_checks(text_pairs(candidate_good=False), CFG)
    assert reference_checks[0].outcome == FAIL  # chrF alone would reject...
    checks = decide_with_judge(reference_checks, judged(14, 1, 5), CFG)
    # ...but the judge prefers the candidate's replies: it decides, chrF is reported.
    assert [c.outcome for c in checks] == [PASS, "info"] and combine(checks) == "pass"
    assert "14 wins, 1 losses, 5 ties" in checks[0].detail and "judge-7b" in checks[0].name
    assert decide_with_judge(reference_checks, judged(1, 14, 5), CFG)[0].outcome == FAIL
    assert decide_with_judge(reference_checks, judged(5, 4, 11), CFG)[0].outcome == HOLD
    figures = judged(2, 1, 0).figures()
    assert figures["wins"] == 2 and "{reference}" in figures["template"]
    chat = judge_messages([{"role": "system", "content": "hidden"},
                           {"role": "user", "content": "Table for two?"}], "Sure.", "Yes.", "No.")
    assert "hidden" not in chat[1]["content"] and "Reply A:\nYes." in chat[1]["content"]


# ------------------------------------------------------------------ preference pairs
def test_each_correction_of_a_served_answer_is_a_preference_pair(schema_file: Path) -> None:
    from tuneloop.services.curation import preferences as prefs
    from tuneloop.services.curation.core import prompt_key

    cfg = CurationSettings()
    candidates = [
        cand(1, completion="We are closed.", correction="We open at 9am."),  # a pair
        cand(2, completion="Booked.", correction=" booked. "),  # the same answer
        cand(3, completion="", correction="Booked for two."),  # nothing was served
        cand(4, completion="Hi", rating=1.0),  # no correction: not a pair
        cand(5, completion="No.", correction="Yes, call me at bob@example.com."),  # scrubbed
        cand(6, prompt="book a table number 1", completion="Sorry.", correction="Sure."),
    ]
    golden = GoldenIndex(keys=frozenset({prompt_key("book a table number 5")}))
    result = prefs.correction_pairs(candidates, GoldenIndex(), cfg, TaskSpec(kind="text"))
    assert {(p.source_event_id, p.chosen, p.rejected) for p in result.pairs} == {
        ("e6", "Sure.", "Sorry."), ("e5", "Yes, call me at [EMAIL].", "No.")}
    # e6 is newer and asks the same as e1: e1's pair is the older one.
    assert result.dropped == {prefs.SAME_ANSWER: 1, prefs.NOTHING_SERVED: 1, prefs.OLDER: 1}
    guarded = prefs.correction_pairs(candidates, golden, cfg, TaskSpec(kind="text"))
    assert guarded.dropped[prefs.GOLDEN] == 1
    again = prefs.correction_pairs(candidates, GoldenIndex(), cfg, TaskSpec(kind="text"))
    assert [(p.pair_id, p.split) for p in again.pairs] == [(p.pair_id, p.split) for p in result.pairs]
    task = json_task(schema_file, system_prompt="Extract.")
    extraction = prefs.correction_pairs(
        [cand(7, completion='{"city": "Pari"}', correction='{"city":"Paris"}'),
         cand(8, completion='{"city": "Oslo"}', correction='{"town": "Oslo"}')], GoldenIndex(), cfg, task)
    (pair,) = extraction.pairs
    assert pair.chosen == '{"city": "Paris"}' and pair.messages[0]["content"] == "Extract."
    assert extraction.dropped[prefs.BAD_CORRECTION] == 1


def test_a_chat_without_a_system_turn_gets_the_tasks_system_prompt() -> None:
    from tuneloop.serving.gateway.protocol import check_chat, with_system_prompt

    body = {"model": "support-bot", "messages": [{"role": "user", "content": "hi"}]}
    new_body, turns = with_system_prompt(body, check_chat(body), "Reply kindly.")
    assert new_body["messages"][0] == turns[0] == {"role": "system", "content": "Reply kindly."}
    assert body["messages"] == [{"role": "user", "content": "hi"}]  # the client's is untouched
    own = {"model": "support-bot", "messages": [{"role": "developer", "content": "Be brief."},
                                                {"role": "user", "content": "hi"}]}
    assert with_system_prompt(own, check_chat(own), "Reply kindly.") == (own, check_chat(own))


def test_a_json_golden_set_that_is_not_json_holds_the_gate_naming_the_fix() -> None:
    refs = ['{"city": "Paris"}', "card_arrival"]
    checks, _ = golden_checks(Paired(refs, [None, None], refs, refs, kind="json", schema=SCHEMA),
                              CFG)
    assert [c.outcome for c in checks] == [HOLD] and "1 of 2 golden references" in checks[0].detail


def test_a_json_alias_decodes_under_its_schema_unless_the_client_names_a_format(
        schema_file: Path) -> None:
    from tuneloop.serving.gateway.protocol import with_response_format

    task = json_task(schema_file)
    fmt = task.response_format()
    assert fmt == {"type": "json_schema",
                   "json_schema": {"name": "answer", "schema": task.schema_document}}
    assert task.describe()["decode_with_schema"] is True
    assert json_task(schema_file, decode_with_schema=False).response_format() is None
    assert TaskSpec(kind="text").response_format() is None
    body = {"model": "support-bot", "messages": [{"role": "user", "content": "hi"}]}
    assert with_response_format(body, fmt) == dict(body, response_format=fmt)
    assert "response_format" not in body  # the client's body is untouched
    own = dict(body, response_format={"type": "text"})
    assert with_response_format(own, fmt) is own
    for constraint in ({"tools": [{"type": "function", "function": {"name": "f"}}]},
                       {"guided_json": {"type": "object"}}, {"guided_choice": ["a", "b"]},
                       {"structured_outputs": {"regex": "[a-z]+"}}):
        constrained = dict(body, **constraint)
        assert with_response_format(constrained, fmt) is constrained
    for no_constraint in ({"tools": None}, {"tools": []}, {"tool_choice": "none"}):
        assert with_response_format(dict(body, **no_constraint), fmt)["response_format"] == fmt
    assert with_response_format(body, None) is body
