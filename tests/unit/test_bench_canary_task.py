"""The pure parts of ``tuneloop bench canary --task json|text``: the groups it draws, the
task config it writes, the datasets and the simulated users' verdicts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tuneloop.bench._canary_task import (
    GOLDEN_PER_GROUP,
    configure,
    judge,
    pick_groups,
    write_datasets,
)
from tuneloop.runtime.settings import TaskSpec, load_settings
from tuneloop.services.demo.banking77 import Query
from tuneloop.services.demo.task_data import Row
from tuneloop.services.store.database import AnyStore


def _rows(groups: dict[str, int], prefix: str = "t") -> list[Row]:
    return [Row(f"{prefix} {g} {i}", json.dumps({"slot": f"{g}{i}"}), (g,))
            for g, n in groups.items() for i in range(n)]


def test_groups_are_drawn_at_random_old_ones_with_test_rows() -> None:
    train = _rows({"a": 10, "b": 10, "c": 10, "d": 10, "e": 3}) + [
        Row("two services", "{}", ("a", "e"))]
    test = _rows({"a": 2, "b": 2, "c": 1}, "q")
    old, new = pick_groups(train, test, 2, 2, min_train=5, min_test=2, seed=0)
    assert set(old) == {"a", "b"}  # the only ones with two test rows of their own
    assert set(new) <= {"c", "d"} and len(new) == 2  # e has too few train rows
    assert pick_groups(train, test, 2, 2, 5, 2, seed=0) == (old, new)  # seeded
    with pytest.raises(ValueError, match="needs 3 with test rows"):
        pick_groups(train, test, 3, 1, 5, 2, seed=0)


def test_the_task_config_reaches_every_process_through_its_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text('text,target,intent\nhi,"{""a"": 1}",x\n')
    monkeypatch.setenv("TUNELOOP_CONFIG", str(tmp_path / "none.toml"))
    spec = configure("json", tmp_path, data)
    assert os.environ["TUNELOOP_CONFIG"] == str(tmp_path / "tuneloop.toml")
    # No schema in the folder: the one its targets satisfy is derived and used.
    assert spec.schema_document and spec.schema_document["properties"] == {
        "a": {"type": "integer"}}
    loaded = load_settings().task
    assert (loaded.kind, loaded.system_prompt, loaded.max_answer_tokens) == (
        "json", spec.system_prompt, spec.max_answer_tokens)


def test_the_bad_dataset_teaches_other_queries_targets(tmp_path: Path, any_store: AnyStore) -> None:
    store = any_store
    spec = TaskSpec(kind="text", system_prompt="Reply.")
    train = _rows({"a": 30, "b": 30, "c": 30})
    test = _rows({"a": GOLDEN_PER_GROUP + 2, "b": GOLDEN_PER_GROUP + 2}, "q")
    n = write_datasets(store, spec, train, test, ["a", "b"], ["c"], per_group=4, seed=1,
                       test_per_group=4)
    assert n == 2 * GOLDEN_PER_GROUP  # that many test rows of each old group
    with store.connect() as con:
        rows = con.execute("SELECT version, split, prompt, completion, messages FROM "
                           "dataset_examples ORDER BY version, example_id").fetchall()
    by = {v: [r for r in rows if r[0] == v] for v in ("bench-old", "bench-bad", "bench-good")}
    assert [len(by[v]) for v in by] == [20, 20, 30]
    assert sum(r[1] == "train" for r in by["bench-old"]) == 8
    old = {r[2]: r[3] for r in by["bench-old"] if r[1] == "train"}
    bad = {r[2]: r[3] for r in by["bench-bad"] if r[1] == "train"}
    assert old.keys() == bad.keys() and sorted(old.values()) == sorted(bad.values())
    assert sum(old[k] != bad[k] for k in old) > len(old) // 2  # shuffled, not kept
    # Held out, the bad dataset keeps the true answers: the gate judges it against them.
    assert [r[2:4] for r in by["bench-old"] if r[1] != "train"] == \
        [r[2:4] for r in by["bench-bad"] if r[1] != "train"]
    chat = json.loads(by["bench-good"][0][4])
    assert [m["role"] for m in chat] == ["system", "user", "assistant"]
    assert chat[0]["content"] == "Reply."


def test_simulated_users_judge_each_kind_its_own_way(tmp_path: Path) -> None:
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "string"}},
                                  "additionalProperties": False}))
    right = judge(TaskSpec(kind="json", json_schema=schema))
    target = Query("q", '{"a": "x"}')
    assert right('{"a": "x"}', target) and right('```json\n{"a": "X"}\n```', target)
    assert not right('{"a": "y"}', target) and not right("x", target)
    reply = judge(TaskSpec(kind="text"))
    assert reply("There is True Grit.", Query("q", "There's True Grit."))
    assert not reply("I cannot help with that.", Query("q", "There's True Grit."))
