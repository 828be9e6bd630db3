"""The golden set for each task kind: a file read as curation reads feedback, references a
task cannot judge left out (nightly check, training, test split) or removed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tuneloop.cli.data import golden_app
from tuneloop.runtime.settings import CanarySettings, Settings, TaskSpec, load_settings
from tuneloop.services.canary.core import HOLD, Paired, golden_checks, improvement_checks
from tuneloop.services.curation import golden
from tuneloop.services.curation.core import Example, example_id
from tuneloop.services.store.database import Store

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"},
                                           "guests": {"type": "integer", "minimum": 1}},
          "required": ["city"], "additionalProperties": False}
CFG = CanarySettings(bootstrap_resamples=300)
OBJECTS = ['{"city": "Paris", "guests": 2}', '{"city": "Rome"}', '{"city": "Oslo", "guests": 1}']


@pytest.fixture
def schema_file(tmp_path: Path) -> Path:
    path = tmp_path / "booking.schema.json"
    path.write_text(json.dumps(SCHEMA))
    return path


def json_settings(tmp_path: Path, schema_file: Path) -> Settings:
    return load_settings({"home": tmp_path, "tasks.support-bot.kind": "json",
                          "tasks.support-bot.json_schema": str(schema_file),
                          "tasks.support-bot.system_prompt": "Extract the booking."})


def chat(prompt: str, answer: str, label: str | None = None) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}], "label": label}


def example(prompt: str, answer: str) -> Example:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return Example(example_id(messages), None, None, messages, prompt, answer)


# ------------------------------------------------------------------ from a file
def test_a_golden_file_is_read_as_curation_reads_feedback_for_a_json_task(
        tmp_path: Path, schema_file: Path) -> None:
    task = json_settings(tmp_path, schema_file).task
    path = tmp_path / "golden.jsonl"
    path.write_text(json.dumps(chat("Two of us in Paris", '{ "guests":2,"city":"Paris" }')) + "\n")
    (ex,) = golden.from_jsonl(path, task)
    assert ex.completion == '{"guests": 2, "city": "Paris"}'  # canonical, as curation keeps it
    assert ex.messages[0] == {"role": "system", "content": "Extract the booking."}
    assert ex.messages[-1] == {"role": "assistant", "content": ex.completion}
    assert ex.prompt == "Two of us in Paris" and ex.source_event_id is None


def test_a_golden_file_names_every_bad_line_by_number(tmp_path: Path, schema_file: Path) -> None:
    task = json_settings(tmp_path, schema_file).task
    path = tmp_path / "golden.jsonl"
    path.write_text("\n".join([
        json.dumps(chat("Paris for two", '{"city": "Paris", "guests": 2}')),
        json.dumps(chat("Where to?", "card_arrival")),                  # prose, not an object
        "",
        json.dumps(chat("Rome for none", '{"city": "Rome", "guests": 0}')),  # schema says no
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),  # no answer
    ]) + "\n")
    with pytest.raises(ValueError) as raised:
        golden.from_jsonl(path, task)
    message = str(raised.value)
    assert message.startswith(f"4 bad lines in {path}, nothing added")
    assert f"{path}:2: the answer is not an object the json task's schema accepts: not a " \
           "JSON object" in message
    assert f"{path}:4: the answer is not an object" in message and "minimum" in message
    assert f"{path}:5: not JSON" in message
    assert f"{path}:6: the last message must be the assistant's answer" in message
    assert f"{path}:1:" not in message


def test_a_golden_file_for_a_label_task_keeps_its_answers_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "golden.jsonl"
    path.write_text(json.dumps(chat("Where is my card?", "card_arrival", "card_arrival")) + "\n")
    (ex,) = golden.from_jsonl(path, TaskSpec())
    assert (ex.completion, ex.label, len(ex.messages)) == ("card_arrival", "card_arrival", 2)


# ------------------------------------------------------------------ removing
def test_golden_remove_drops_what_the_task_cannot_judge_or_what_is_named(
        tmp_path: Path, schema_file: Path) -> None:
    settings = json_settings(tmp_path, schema_file)
    prose = [example("Where is my card?", "card_arrival"), example("Refund please", "refund")]
    objects = [example(f"booking {i}", ref) for i, ref in enumerate(OBJECTS)]
    with Store.of(settings).connect() as con:
        golden.add(con, prose + objects, cap=100)
    runner = CliRunner()

    def remove(*args: str) -> str:
        result = runner.invoke(golden_app, ["remove", *args], obj=settings)
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    assert "removed 2, now 3" in remove("--invalid")
    with Store.of(settings).connect() as con:
        assert sorted(ex.completion for ex in golden.load(con)) == sorted(OBJECTS)
    assert "every golden reference is one a json task can judge" in remove("--invalid")
    # By id or by prompt (case and spacing aside); a key naming nothing removes nothing.
    missing = runner.invoke(golden_app, ["remove", objects[0].example_id, "no such"],
                            obj=settings)
    assert missing.exit_code != 0
    assert "removed 2, now 1" in remove(objects[0].example_id, "  BOOKING 1 ")
    assert runner.invoke(golden_app, ["remove"], obj=settings).exit_code != 0


def test_the_gate_names_the_command_that_replaces_unjudgeable_references() -> None:
    refs = [OBJECTS[0], "card_arrival"]
    checks, _ = golden_checks(Paired(refs, [None, None], refs, refs, kind="json",
                                     schema=SCHEMA), CFG)
    assert [c.outcome for c in checks] == [HOLD]
    assert "`tuneloop golden remove --invalid`" in checks[0].detail


# ------------------------------------------------------------------ leaving out
def test_the_json_test_split_leaves_out_references_that_are_not_objects() -> None:
    refs = [*OBJECTS * 4, "card_arrival", "a prose answer"]  # the last: a newer event's
    n = len(refs)
    checks, figures = improvement_checks(
        Paired(refs, [None] * n, ["{}"] * n, refs, kind="json", schema=SCHEMA), CFG, fresh_n=1)
    assert (figures["test_n"], figures["fresh_n"], figures["test_left_out"]) == (12, 0, 2)
    assert "12 test-split + 0 newer labelled examples (2 left out" in checks[0].detail
    held, figures = improvement_checks(
        Paired(["x", "y"], [None] * 2, ["{}"] * 2, ["{}"] * 2, kind="json", schema=SCHEMA), CFG)
    assert [c.outcome for c in held] == [HOLD] and figures == {"test_left_out": 2}
    assert "none of the 2 test-split and newer references is a JSON object" in held[0].detail


def test_the_nightly_check_leaves_out_references_a_json_task_cannot_judge(
        tmp_path: Path, schema_file: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The gateway's answers are given here; asking it is tested on the real stack."""
    from tuneloop.serving.canary import production

    settings = json_settings(tmp_path, schema_file)
    asked: list[int] = []

    def answers(_settings: Settings, _version: str | None, gold: list[Example]) -> list[str]:
        asked.append(len(gold))
        return [ex.completion for ex in gold]

    monkeypatch.setattr(production, "answers", answers)
    with Store.of(settings).connect() as con:
        golden.add(con, [example("Where is my card?", "card_arrival")], cap=100)
    with caplog.at_level(logging.WARNING):
        empty = production.check_production(settings)
    assert empty.verdict == "ok" and empty.figures["golden_left_out"] == 1 and asked == []
    assert "golden remove --invalid" in empty.figures["note"]
    with Store.of(settings).connect() as con:
        golden.add(con, [example(f"booking {i}", r) for i, r in enumerate(OBJECTS)], cap=100)
    decision = production.check_production(settings)
    assert asked == [3] and decision.figures["golden_left_out"] == 1
    assert decision.figures["golden_n"] == 3 and decision.figures["score"] == 1.0
    assert "1 of 1 golden references are not JSON objects" in caplog.text


def test_training_leaves_out_golden_references_a_json_task_cannot_judge(
        schema_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tuneloop.training.dataset import ChatExample
    from tuneloop.training.pipeline import judgeable_golden

    task = TaskSpec(kind="json", json_schema=schema_file)
    gold = [ChatExample(str(i), ({"role": "user", "content": "q"},
                                 {"role": "assistant", "content": ref}), ref)
            for i, ref in enumerate([OBJECTS[0], "card_arrival"])]
    with caplog.at_level(logging.WARNING):
        kept, left_out = judgeable_golden(gold, task, "rk-1")
    assert ([ex.example_id for ex in kept], left_out) == (["0"], 1)
    assert "run rk-1: 1 of 2 golden references are not JSON objects" in caplog.text
    assert "golden remove --invalid" in caplog.text
    assert judgeable_golden(gold, TaskSpec(), "rk-1") == (gold, 0)
