"""``tuneloop demo --task json|text`` without the stack: the task-data folder as queries,
the history it sends, how users judge and the demo scores each kind, the goals and the
FIGURE lines, and the settings file the demo writes."""

from __future__ import annotations

import csv
import json
import tomllib
from pathlib import Path

import pytest

from tuneloop.cli.demo_report import figures
from tuneloop.runtime.settings import TaskSpec
from tuneloop.services.demo import banking77
from tuneloop.services.demo.banking77 import Query
from tuneloop.services.demo.result import NEW, OLD, Result, goals, mean_delta, missed_goals
from tuneloop.services.demo.scenario import SMALL, plan, to_toml
from tuneloop.services.demo.task import DemoTask, load_queries, spec_table
from tuneloop.services.demo.task_data import bundled


def _folder(tmp_path: Path, test_groups: tuple[str, ...]) -> Path:
    """Five groups of 30 train rows; the test split holds 6 rows of ``test_groups`` only,
    and one test query repeats a train query."""
    for split in ("train", "test"):
        with (tmp_path / f"{split}.csv").open("w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["text", "target", "intent"])
            for g in ("a", "b", "c", "d", "e"):
                if split == "train":
                    rows = [(f"{g} train {i}", json.dumps({"slot": f"{g}{i}"}), g)
                            for i in range(30)]
                    rows.append((f"{g} both", "{}", f"{g},a"))  # two groups: never used
                elif g in test_groups:
                    rows = [(f"{g} test {i}", json.dumps({"slot": f"t{i}"}), g)
                            for i in range(6)]
                    rows[0] = ("a train 0", rows[0][1], g)
                else:
                    rows = []
                out.writerows(rows)
    return tmp_path


def test_held_out_queries_come_from_the_test_split_or_are_kept_back_from_train(
        tmp_path: Path) -> None:
    folder = _folder(tmp_path, test_groups=("a",))
    groups, train, test = load_queries(folder, heldout=5, min_rows=20, seed=1)
    assert groups == ["a", "b", "c", "d", "e"]
    by_group = {g: [q for q in test if q.intent == g] for g in groups}
    # "a" has test rows: all six, from the test split; the others keep back 5 train rows.
    assert {q.text for q in by_group["a"]} == {"a train 0"} | {f"a test {i}" for i in range(1, 6)}
    assert all(len(by_group[g]) == 5 and all(" train " in q.text for q in by_group[g])
               for g in "bcde")
    # No held-out query is ever traffic; rows of two groups are used nowhere.
    assert not {q.text for q in train} & {q.text for q in test}
    assert not any("both" in q.text for q in train + test)
    assert all(q.target and q.answer == q.target for q in train)
    # The kept-back rows are a seeded draw.
    assert load_queries(folder, 5, 20, seed=1) == (groups, train, test)
    assert load_queries(folder, 5, 20, seed=2)[2] != test
    # A group with too few rows is not offered.
    assert load_queries(folder, 5, min_rows=31, seed=1)[0] == []


def test_the_history_of_a_task_teaches_the_target_under_the_group_label() -> None:
    queries = [Query(f"q{i}", "g1" if i % 2 else "g2", json.dumps({"n": i})) for i in range(6)]
    events = list(banking77.to_events(queries, accuracy=0.0, system_prompt="Extract.",
                                      source="mine"))
    for q, e in zip(queries, events, strict=True):
        assert e.label == q.intent and e.correction == q.target and e.rating == -1.0
        assert e.completion != q.target and e.completion in {x.target for x in queries}
        assert [m.role for m in e.messages] == ["system", "user"]
        assert e.messages[0].content == "Extract." and e.metadata == {"source": "mine"}
    bare = next(iter(banking77.to_events(queries[:1], system_prompt=None)))
    assert [m.role for m in bare.messages] == ["user"]
    # An intent query's answer is its intent, as before.
    intent = next(iter(banking77.to_events([Query("lost card", "lost_card"),
                                            Query("new pin", "change_pin")], accuracy=0.0)))
    assert intent.correction == "lost_card" and intent.completion == "change_pin"


def _spec(kind: str, tmp_path: Path) -> TaskSpec:
    return TaskSpec(**spec_table(kind, bundled({"json": "snips", "text": "sgd"}[kind]),
                                 tmp_path))


def test_json_answers_are_judged_whole_and_scored_field_by_field(tmp_path: Path) -> None:
    task = DemoTask(_spec("json", tmp_path))
    assert task.headline == "field_exact" and task.answer_tokens == 64
    assert task.chat(Query("hi", "g")) == [{"role": "user", "content": "hi"}]
    queries = [Query("q1", "g", '{"city": "Paris", "date": "today"}'),
               Query("q2", "g", '{"city": "Rome"}'), Query("q3", "g", "{}")]
    answers = ['{"city": "Paris", "date": "tomorrow"}', '{"city": "Rome"}', "not json"]
    assert [task.right(a, q) for a, q in zip(answers, queries, strict=True)] == \
        [False, True, False]
    assert task.per_example(answers, queries) == [0.5, 1.0, 0.0]
    assert task.per_example(["{}"], queries[2:]) == [1.0]
    scores = task.scores(answers, queries)
    assert scores["field_exact"] == pytest.approx(0.5)
    assert scores["parse_rate"] == pytest.approx(2 / 3)
    assert scores["object_exact"] == pytest.approx(1 / 3)
    # SNIPS's schema has no field "mood": an object naming one parses but is not valid.
    assert task.scores(['{"mood": "x"}'], queries[1:2])["schema_valid"] == 0.0


def test_text_answers_are_judged_by_chrf_against_the_reference(tmp_path: Path) -> None:
    task = DemoTask(_spec("text", tmp_path))
    assert task.headline == "chrf" and task.spec.json_schema is None
    q = Query("Any film on tonight?", "Movies_1", "There's True Grit.")
    assert task.right("There is True Grit.", q)
    assert not task.right("I cannot help with that.", q)
    scores = task.scores(["There's True Grit.", "No."], [q, q])
    assert set(scores) == {"chrf", "rouge_l"} and 0.4 < scores["chrf"] < 0.6
    with pytest.raises(ValueError, match="label"):
        DemoTask(TaskSpec()).per_example(["a"], [Query("x", "a")])


def test_a_mean_score_change_has_its_interval_and_both_p_values() -> None:
    before, after = [0.0, 0.2, 0.1, 0.0] * 10, [0.8, 0.9, 0.6, 1.0] * 10
    gain = mean_delta(before, after)
    assert gain.points == pytest.approx(75.0) and gain.queries == 40
    assert gain.ci95[0] > 60 and gain.p_not_better is not None and gain.p_not_better < 0.01
    same = mean_delta(after, after)
    assert same.points == 0 and same.p_fell_beyond_margin > 0.5
    with pytest.raises(ValueError, match="pair"):
        mean_delta([0.1], [0.1, 0.2])


def _result(kind: str, new_before: float, new_after: float, valid: float) -> Result:
    headline = {"json": "field_exact", "text": "chrf"}[kind]
    r = Result("data", ["a"], ["b"], kind=kind, headline=headline,
               shift_to_promotion_s=600.0)
    r.before = {OLD: {headline: 0.8}, NEW: {headline: new_before}}
    r.after = {OLD: {headline: 0.79}, NEW: {headline: new_after, "schema_valid": valid}}
    r.old_intents_delta = mean_delta([0.8] * 20, [0.79] * 20)
    r.new_intents_delta = mean_delta([new_before] * 10 + [0.0] * 10,
                                     [new_after] * 10 + [0.0] * 10)
    return r


def test_task_goals_and_figures_name_the_kinds_metric() -> None:
    good = _result("json", 0.1, 0.7, 0.97)
    assert [g.met for g in goals(good)] == [True] * 5 and not missed_goals(good)
    names = [n for n, _ in figures(good)]
    assert names == ["new_field_exact_before", "new_field_exact_after", "new_field_exact_p",
                     "schema_valid_after", "old_field_exact_delta", "old_field_exact_delta_low",
                     "old_field_exact_delta_high", "shift_to_promotion_s"]
    assert dict(figures(good))["old_field_exact_delta"] == "-1.0"
    invalid = _result("json", 0.1, 0.7, 0.80)
    assert missed_goals(invalid) == ["schema-valid rate 0.800 < 0.95"]
    flat = _result("text", 0.3, 0.3, 0.0)
    assert [n for n, _ in figures(flat)][:3] == ["new_chrf_before", "new_chrf_after",
                                                 "new_chrf_p"]
    assert "schema_valid_after" not in dict(figures(flat))
    assert any("not a significant gain" in m for m in missed_goals(flat))


def test_the_demo_settings_carry_the_alias_task_as_a_nested_table(tmp_path: Path) -> None:
    spec = spec_table("json", bundled("snips"), tmp_path)
    text = to_toml({"home": "h", "tasks": {"support-bot": spec}, **SMALL.settings})
    assert '[tasks."support-bot"]' in text
    loaded = tomllib.loads(text)
    assert loaded["tasks"]["support-bot"] == spec and loaded["canary"] == SMALL.settings["canary"]


def test_a_folder_without_a_schema_gets_the_one_its_targets_satisfy(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    folder = _folder(tmp_path / "data", test_groups=())
    spec = TaskSpec(**spec_table("json", folder, tmp_path))
    assert spec.json_schema == tmp_path / "schema.json"
    assert spec.schema_document and "slot" in spec.schema_document["properties"]
    with pytest.raises(ValueError, match="json or text"):
        spec_table("label", folder, tmp_path)


def test_a_folder_whose_schema_refuses_its_targets_is_refused_naming_them(
        tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    folder = _folder(tmp_path / "data", test_groups=("a",))
    (folder / "schema.json").write_text(json.dumps({
        "type": "object", "properties": {"slot": {"type": "string", "maxLength": 2}}}))
    with pytest.raises(ValueError, match=r"train.csv row 11: slot: 'a10' is too long"):
        spec_table("json", folder, tmp_path)
    (folder / "schema.json").write_text(json.dumps({"type": "object"}))
    assert spec_table("json", folder, tmp_path)["json_schema"] == str(folder / "schema.json")


def test_the_task_demo_plans_on_both_bundled_folders() -> None:
    from tuneloop.services.demo.scenario import FULL, for_kind

    for name, kind in (("snips", "json"), ("sgd", "text")):
        for sc in (for_kind(SMALL, kind), for_kind(FULL, kind)):
            groups, train, test = load_queries(
                bundled(name), sc.heldout_per_intent,
                sc.history_per_intent + sc.heldout_per_intent + 20)
            p = plan(sc, groups, train, test, seed=0)
            # As many new groups as the scenario brings, or as the data has left.
            assert len(p.new) == min(sc.new_intents, len(groups) - len(p.old))
            assert p.new and p.history and p.shifted
            assert len(p.heldout_new) == sc.heldout_per_intent * len(p.new)
            assert len(p.heldout_old) == sc.heldout_per_intent * len(p.old)
            assert not {q.text for q in p.heldout_old + p.heldout_new} & \
                {q.text for q in p.history + p.steady + p.shifted}


def test_the_dpo_phase_adds_its_figures_after_the_kinds(
        capsys: pytest.CaptureFixture[str]) -> None:
    from tuneloop.cli.demo_report import print_figures

    r = _result("text", 0.2, 0.4, 0.0)
    r.dpo = {"pairs_train": 80.0, "pairs_held_out": 30.0, "pair_accuracy_sft": 0.6,
             "pair_accuracy_dpo": 0.8}
    print_figures(r)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3:] == ["FIGURE dpo_pair_accuracy_sft=0.600",
                          "FIGURE dpo_pair_accuracy_dpo=0.800", "FIGURE dpo_held_out_pairs=30"]
    assert lines[0] == "FIGURE new_chrf_before=0.200"
