"""The demo without the stack: its scenarios and plan, its goals, what it reads from the
store (real DuckDB file), and the report it writes."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tuneloop.runtime.settings import Settings
from tuneloop.services.canary.core import Decision
from tuneloop.services.canary.store import record_decision
from tuneloop.services.curation.datasets import report_of as dataset_report
from tuneloop.services.demo import banking77
from tuneloop.services.demo.banking77 import Query
from tuneloop.services.demo.result import (
    NEW,
    OLD,
    Result,
    goals,
    missed_goals,
    named_intents,
    old_delta,
    scores,
)
from tuneloop.services.demo.scenario import FULL, SMALL, plan
from tuneloop.services.demo.store import (
    activity_since,
    promoted_at,
)
from tuneloop.services.drift.store import first_alarm_clusters
from tuneloop.services.registry import store as registry
from tuneloop.services.store.database import AnyStore


def _dataset(n_intents: int = 12, per_intent: int = 60) -> tuple[list[str], list[Query]]:
    intents = [f"intent_{i}" for i in range(n_intents)]
    return intents, [Query(f"{name} query {j}", name) for name in intents
                     for j in range(per_intent)]


def test_the_small_scenario_is_the_full_one_with_fewer_intents() -> None:
    assert (SMALL.max_old, SMALL.new_intents) == (6, 3)
    assert (FULL.max_old, FULL.new_intents) == (40, 10)
    # The same path: the same loop settings, scaled windows.
    assert set(SMALL.settings) == set(FULL.settings)
    assert SMALL.settings["loop"] == FULL.settings["loop"]


def test_the_plan_is_seeded_and_keeps_old_and_new_apart() -> None:
    intents, train = _dataset()
    _, test = _dataset(per_intent=30)
    first = plan(SMALL, intents, train, test, seed=3)
    assert first == plan(SMALL, intents, train, test, seed=3)
    assert first.old != plan(SMALL, intents, train, test, seed=4).old
    assert len(first.old) == 6 and len(first.new) == 3 and not set(first.old) & set(first.new)
    assert {q.intent for q in first.history} == set(first.old)
    assert len(first.history) == SMALL.history_per_intent * 6
    # Steady traffic repeats no query of the history, and asks each old intent as
    # often as the history does, however many rows the data has of each.
    assert not {q.text for q in first.history} & {q.text for q in first.steady}
    assert len(set(Counter(q.intent for q in first.steady).values())) == 1
    uneven = train + [Query(f"{first.old[0]} extra {j}", first.old[0]) for j in range(500)]
    steady = plan(SMALL, intents, uneven, test, seed=3).steady
    assert len(set(Counter(q.intent for q in steady).values())) == 1
    new_share = sum(q.intent in first.new for q in first.shifted) / len(first.shifted)
    assert new_share == pytest.approx(SMALL.new_share, abs=0.01)
    # The shift asks each new intent alike, however many rows each has (the first
    # intent with ten times the others' rows must not crowd out the last).
    crowded = train + [Query(f"{first.new[0]} extra {j}", first.new[0]) for j in range(600)]
    shifted = Counter(q.intent for q in plan(SMALL, intents, crowded, test, seed=3).shifted
                      if q.intent in first.new)
    rows = Counter(q.intent for q in crowded if q.intent in first.new)
    even = sum(shifted.values()) // len(first.new)
    assert all(shifted[i] >= min(rows[i], even) for i in first.new), (shifted, rows)
    assert len(first.heldout_new) == SMALL.heldout_per_intent * 3
    assert {q.text for q in first.heldout_old} <= {q.text for q in test}


def test_a_dataset_too_small_for_the_traffic_is_refused_with_the_figures() -> None:
    intents, train = _dataset(per_intent=SMALL.history_per_intent)
    with pytest.raises(ValueError, match="no traffic for a phase"):
        plan(SMALL, intents, train, train, seed=0)


def test_the_plan_runs_on_the_bundled_data() -> None:
    p = plan(SMALL, banking77.intents(), banking77.load("train"), banking77.load("test"), 0)
    assert len(p.old) == 6 and len(p.new) == 3 and p.history and p.shifted


def _result(**over: object) -> Result:
    r = Result("data", ["a", "b"], ["c"], shift_to_promotion_s=600.0,
               before={OLD: {"accuracy": 0.8, "macro_f1": 0.8},
                       NEW: {"accuracy": 0.0, "macro_f1": 0.0}},
               after={OLD: {"accuracy": 0.8, "macro_f1": 0.79},
                      NEW: {"accuracy": 0.9, "macro_f1": 0.9}})
    for key, value in over.items():
        setattr(r, key, value)
    return r


def test_goals_met_and_missed() -> None:
    assert missed_goals(_result()) == [] and all(g.met for g in goals(_result()))
    missed = missed_goals(_result(shift_to_promotion_s=1500.0, steady_retrains=1,
                                  after={OLD: {"accuracy": 0.7, "macro_f1": 0.7},
                                         NEW: {"accuracy": 0.5, "macro_f1": 0.5}}))
    assert [m.split()[0] for m in missed] == ["new-intent", "old-intent", "shift", "steady"]
    # No promotion: the goal is missed, and the wait that ended says so (not the goals).
    none = _result(shift_to_promotion_s=None)
    assert not goals(none)[2].met and missed_goals(none) == []


def test_scores_and_the_old_intents_change() -> None:
    queries = [Query(f"q{i}", "a" if i % 2 else "b") for i in range(40)]
    right = [q.intent for q in queries]
    assert scores(right, queries) == {"accuracy": 1.0, "macro_f1": 1.0}
    delta = old_delta(queries, right, right)
    assert delta.points == 0 and delta.queries == 40 and delta.p_fell_beyond_margin > 0.05


def test_named_intents_are_the_new_ones_the_clusters_show() -> None:
    clusters = [{"status": "new", "labels": [{"label": "c"}, {"label": "a"}]},
                {"status": "same", "labels": [{"label": "d"}], "new_labels": ["e"]}]
    assert named_intents(clusters, ["c", "d", "e"]) == ["c", "e"]


def test_what_the_demo_reads_from_the_store(tmp_path: Path, any_store: AnyStore) -> None:
    store = any_store
    start = datetime.now(UTC)
    clusters = [{"name": "c1", "status": "new", "labels": []}]
    with store.connect() as con:
        for i, drifted in enumerate((False, True, True)):
            con.execute("INSERT INTO drift_reports VALUES (?, ?, 'r', 'c', 1, 1, 0.1, 0.5, ?, "
                        "'{}', ?)", [f"r{i}", start + timedelta(seconds=i), drifted,
                                     json.dumps(clusters if i == 1 else [])])
        for verdict in ("start", "trained", "skipped"):
            record_decision(con, Decision("retrain", None, None, verdict), None)
        con.execute("INSERT INTO datasets (version, created_at, content_hash, parent_versions, "
                    "filters, report, n_train, n_validation, n_test) "
                    "VALUES ('ds1', now(), 'h', '[]', '{}', ?, 1, 1, 1)",
                    [json.dumps({"kept": 3})])
        source = tmp_path / "peft"
        source.mkdir()
        (source / "adapter_config.json").write_text("{}")
        (source / "adapter_model.safetensors").write_bytes(b"w")
        version = registry.publish_adapter(
            con, tmp_path / "adapters", source, alias="support-bot", base_model="b",
            base_hash="h", dataset_version="ds1", run_key=None, details={}).version
        assert promoted_at(con, version) is None
        registry.promote(con, version, "production", "test")
        assert promoted_at(con, version) is not None
        activity = activity_since(con, start)
        assert (activity.drift_alarms, activity.retrains) == (2, 2)
        assert activity_since(con, datetime.now(UTC) + timedelta(hours=1)).drift_alarms == 0
        assert first_alarm_clusters(con, start) == clusters
        assert first_alarm_clusters(con, start + timedelta(hours=1)) is None
        assert dataset_report(con, "ds1") == {"kept": 3} and dataset_report(con, "x") == {}


def test_the_report_and_the_json_on_an_empty_run(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from tuneloop.cli.demo_report import print_figures, write_report

    settings = Settings(home=tmp_path)
    result = _result(promoted_version="v9", shift_at=datetime.now(UTC).isoformat(),
                     drift_clusters=[{"name": "c1", "status": "new", "size": 4, "share": 0.2,
                                      "reference_share": 0.0, "labels": []}])
    page = write_report(settings, result).read_text()
    assert "<h2>goals</h2>" in page and "MISSED" not in page and "c1" in page
    assert page.count("<img") == 1  # only the before/after scores: nothing else ran
    doc = json.loads(json.dumps(asdict(result)))
    assert doc["after"][NEW]["macro_f1"] == 0.9 and doc["old_intents_delta"] is None
    print_figures(result)
    figures = dict(line.removeprefix("FIGURE ").split("=")
                   for line in capsys.readouterr().out.splitlines())
    assert figures == {"new_intents_macro_f1_before": "0.000",
                       "new_intents_macro_f1_after": "0.900",
                       "old_intents_macro_f1_delta": "-1.0", "shift_to_promotion_s": "600"}


def test_the_command_offers_full_and_refuses_two_scenarios(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "TUNELOOP_HOME": str(tmp_path)}
    env.pop("TUNELOOP_CONFIG", None)
    cli = [sys.executable, "-m", "tuneloop.cli.main", "demo"]
    both = subprocess.run([*cli, "--full", "--quick"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert both.returncode == 2 and "pass one" in both.stderr, both.stderr
    assert not (tmp_path / "demo").exists()  # refused before anything was touched
    usage = subprocess.run([*cli, "--help"], env={**env, "COLUMNS": "200"},
                           capture_output=True, text=True, timeout=120)
    assert "--full" in usage.stdout and "--quick" in usage.stdout


def test_the_demo_settings_serve_the_task_it_names_whatever_the_users_say(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's settings name a json task for the alias: ``--task label`` serves labels,
    ``--task text`` a reply task with its own recipe (one YAML document, no repeated key)."""
    import tomllib

    import yaml

    from tuneloop.cli.demo import demo_settings
    from tuneloop.runtime.settings import load_settings
    from tuneloop.services.demo.scenario import to_toml

    user = {"serving": {"alias": "helpdesk"}, "drift": {"interval_s": 5},
            "tasks": {"helpdesk": {"kind": "json", "json_schema": "/nowhere.json"}}}
    label, recipe = demo_settings(user, SMALL, "label", Path(), tmp_path)
    assert recipe is None and "tasks" not in label
    assert label["drift"]["interval_s"] == SMALL.settings["drift"]["interval_s"]
    text, recipe = demo_settings(user, SMALL, "text", Path(), tmp_path)
    assert text["tasks"]["helpdesk"]["kind"] == "text"
    assert "json_schema" not in text["tasks"]["helpdesk"]
    assert recipe is not None and recipe.count("epochs:") == 1
    assert yaml.safe_load(recipe)["epochs"] == 3
    from tuneloop.training.config import DEFAULT_CONFIG, RecipeConfig

    written = RecipeConfig.from_file(_write(tmp_path / "text.yaml", recipe))
    assert written.continued_learning_rate == RecipeConfig.from_file(DEFAULT_CONFIG).learning_rate
    assert written.continued_learning_rate < written.learning_rate
    # A reply's chrF spreads widely: the gate and the first retrain take more examples.
    assert text["canary"]["fresh_max_examples"] > SMALL.settings["canary"]["fresh_max_examples"]
    assert text["loop"]["min_examples_per_new_label"] > label["loop"].get(
        "min_examples_per_new_label", 20)
    assert label["canary"] == SMALL.settings["canary"]
    (tmp_path / "recipe.yaml").write_text(recipe)
    (tmp_path / "demo.toml").write_text(to_toml(text))
    assert tomllib.loads((tmp_path / "demo.toml").read_text()) == text
    monkeypatch.setenv("TUNELOOP_CONFIG", str(tmp_path / "demo.toml"))
    settings = load_settings({"home": tmp_path})
    assert settings.task.kind == "text" and settings.serving.alias == "helpdesk"


def test_a_reply_task_reads_more_held_out_queries_and_waits_longer() -> None:
    from tuneloop.services.demo.scenario import FULL, for_kind

    for sc in (SMALL, FULL):
        assert for_kind(sc, "label") == sc == for_kind(sc, "json")
        text = for_kind(sc, "text")
        assert text.heldout_per_intent == 2 * sc.heldout_per_intent
        assert text.shift_timeout_s > sc.shift_timeout_s
        assert (text.history_per_intent, text.settings) == (sc.history_per_intent, sc.settings)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
