"""``tuneloop status``: the store's figures through the stage shells, the JSON document's
shape, and the rendering of every section (real DuckDB file, no stack)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tuneloop.cli.common import console
from tuneloop.cli.status import StatusReport, TopicLine, render_status
from tuneloop.infra.prefect_server import FlowRunLine
from tuneloop.infra.stack import Health
from tuneloop.runtime.settings import TaskSpec
from tuneloop.services.canary.core import Check, Decision
from tuneloop.services.canary.store import record_decision
from tuneloop.services.evaluation.tasks import evaluate
from tuneloop.services.loop.status import StoreFigures, golden_score, read_store_figures
from tuneloop.services.registry import store as registry
from tuneloop.services.store.database import AnyStore, Store

JSON_KEYS = {"health", "topics", "replication", "counts", "dead_letters", "adapters",
             "latest_drift", "db", "serving", "freeze", "canary", "last_change", "store_busy",
             "ingest", "outbox_backlog", "flow_runs", "task"}


@pytest.fixture(autouse=True)
def _terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendering is checked at a terminal's common width, whatever runs the tests."""
    monkeypatch.setattr(console, "width", 100)


def _publish(con, tmp_path: Path, name: str, golden: dict[str, Any] | None) -> str:
    source = tmp_path / name
    source.mkdir()
    (source / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (source / "adapter_model.safetensors").write_bytes(name.encode())
    metrics = {"golden": golden} if golden else {}
    return registry.publish_adapter(
        con, tmp_path / "adapters", source, alias="support-bot", base_model="base",
        base_hash="h", dataset_version="ds1", run_key=None,
        details={"metrics": metrics}).version


def _filled_store(tmp_path: Path, store: AnyStore) -> AnyStore:
    with store.connect() as con:
        first = _publish(con, tmp_path, "a", {"accuracy": 0.8, "macro_f1": 0.75})
        _publish(con, tmp_path, "b", None)
        registry.promote(con, first, "production", "the offline gate passed")
        for offset in (17, 4242, 9):
            con.execute("INSERT INTO dead_letters (dead_letter_id, received_at, source_topic, "
                        "source_partition, source_offset, event_key, event_id, reason, payload) "
                        "VALUES (?, now(), 'feedback.v1', 0, ?, NULL, NULL, ?, 'x')",
                        [str(uuid.uuid4()), offset,
                                          f"not JSON at offset {offset}"])
        con.execute("INSERT INTO dead_letters (dead_letter_id, received_at, source_topic, "
                    "source_partition, source_offset, event_key, event_id, reason, payload) "
                    "VALUES ('d4', now(), 'feedback.v1', 0, 1, NULL, NULL, "
                    "'schema: missing rating', 'x')")
        con.execute("INSERT INTO drift_reports VALUES ('r1', ?, 'ref', 'cur', 100, 50, 0.31, "
                    "0.002, true, '{}', '[]')", [datetime.now(UTC)])
        record_decision(con, Decision("offline", "v2", first, "reject",
                                      [Check("golden", "fail", 0.1, None, "", "worse")]), None)
    return store


def test_the_store_figures_come_from_the_stage_shells(tmp_path: Path,
                                                     any_store: AnyStore) -> None:
    figures = read_store_figures(_filled_store(tmp_path, any_store))
    assert figures.exists and figures.busy is None
    assert figures.counts["adapters"] == 2 and figures.counts["dead_letters"] == 4
    # Reasons that differ only in numbers are one group, the commonest first.
    assert [(d.reason, d.count) for d in figures.dead_letters] == [
        ("not JSON at offset N", 3), ("schema: missing rating", 1)]
    assert [a.version for a in figures.adapters] == ["v2", "v1"]  # newest first
    v1 = figures.adapters[1]
    assert (v1.state, v1.golden_accuracy, v1.golden_macro_f1) == ("production", 0.8, 0.75)
    # A report from before task kinds is a label task's: its headline is macro-F1.
    assert (v1.golden_metric, v1.golden_score) == ("macro-F1", 0.75)
    assert figures.adapters[0].golden_accuracy is None
    assert figures.adapters[0].golden_score is None
    assert figures.latest_drift is not None and figures.latest_drift.drifted
    assert figures.last_change is not None
    assert (figures.last_change.version, figures.last_change.to_state) == ("v1", "production")
    assert [d.verdict for d in figures.decisions] == ["reject"]
    assert figures.freeze is None


def test_a_store_that_does_not_exist_gives_empty_figures(tmp_path: Path) -> None:
    figures = read_store_figures(Store(tmp_path / "none.duckdb"))
    assert not figures.exists and figures.counts == {} and figures.adapters == []


def _report(store: StoreFigures) -> StatusReport:
    return StatusReport(
        health=[Health("kafka", True, "127.0.0.1:9092"), Health("gateway", False, "down")],
        topics=[TopicLine("feedback.v1", 0, 10, 8, 2), TopicLine("feedback.dlq", 0, 1, None),
                TopicLine("other", error="unreachable")],
        replication=[], store=store,
        ingest={"events_per_min": 12.0, "lag": 0, "inserted": 40, "dead_letters": 4,
                "duplicates": 0, "updated_at": "2026-01-01T10:11:12"},
        outbox_backlog={"outbox": 3}, serving={},
        flow_runs=[FlowRunLine("drift-check", "Completed", datetime.now(UTC), 4.2),
                   FlowRunLine(error="ConnectError: refused")],
        task={"alias": "support-bot"} | TaskSpec(kind="text", system_prompt="Reply kindly.")
        .describe())


def test_the_json_document_keeps_its_keys_and_shapes(tmp_path: Path) -> None:
    report = _report(read_store_figures(_filled_store(tmp_path, Store(tmp_path / "tuneloop.duckdb"))))
    doc = json.loads(json.dumps(report.to_json(), default=str))
    assert set(doc) == JSON_KEYS
    assert report.down == ["gateway"]
    assert doc["health"][0] == {"component": "kafka", "ok": True, "detail": "127.0.0.1:9092"}
    assert doc["topics"][0] == {"topic": "feedback.v1", "partition": 0, "end": 10,
                                "committed": 8, "lag": 2}
    assert doc["topics"][2] == {"topic": "other", "error": "unreachable"}
    assert doc["dead_letters"][0] == ["not JSON at offset N", 3]
    assert set(doc["adapters"][0]) == {"version", "name", "state", "dataset", "created_at",
                                       "golden_accuracy", "golden_macro_f1", "golden_metric",
                                       "golden_score", "promoted_score"}
    assert len(doc["latest_drift"]) == 1 and doc["latest_drift"][0][1:] == [0.31, 0.002, True]
    assert set(doc["last_change"]) == {"at", "version", "from", "to", "action", "reason"}
    assert set(doc["canary"][0]) == {"created_at", "stage", "candidate", "incumbent", "verdict",
                                     "reason"}
    assert doc["flow_runs"][1] == {"error": "ConnectError: refused"}
    assert doc["task"]["kind"] == "text" and doc["task"]["answer_tokens"] == 96


def test_every_section_renders(tmp_path: Path) -> None:
    report = _report(read_store_figures(_filled_store(tmp_path, Store(tmp_path / "tuneloop.duckdb"))))
    with console.capture() as captured:
        render_status(report)
    text = captured.get()
    for fragment in ("components", "kafka", "feedback.v1", "unreachable", "dead_letters",
                     "events/min", "outbox 3", "not JSON at offset N", "novel share 0.31",
                     "DRIFT", "offline", "last change", "v1", "macro-F1 0.750 (acc 0.800)",
                     "recent flow runs", "drift-check", "ConnectError",
                     "support-bot is a text task", "answers up to 96 tokens",
                     "system prompt: 'Reply kindly.'"):
        assert fragment in text, fragment


def test_an_empty_store_renders_without_its_sections(tmp_path: Path) -> None:
    report = _report(read_store_figures(Store(tmp_path / "none.duckdb")))
    with console.capture() as captured:
        render_status(report)
    assert "does not exist yet" in captured.get()


# Golden reports as training writes them (EvalReport.to_dict()), one per task kind.
JSON_GOLDEN = evaluate("json", ['{"a": 1, "b": 2}'], ['{"a": 1, "b": 3}']).to_dict()
TEXT_GOLDEN = evaluate("text", ["the card arrives on Monday"],
                       ["your card arrives on Monday"]).to_dict()
LABEL_GOLDEN = evaluate("label", ["card_arrival", "top_up"], ["card_arrival", "top_up"],
                        ["card_arrival", "card_arrival"]).to_dict()


@pytest.mark.parametrize(("report", "expected"), [
    (JSON_GOLDEN, ("field F1", 0.5)),
    (TEXT_GOLDEN, ("chrF", TEXT_GOLDEN["score"])),
    (LABEL_GOLDEN, ("macro-F1", LABEL_GOLDEN["macro_f1"])),
    # From before task kinds: a label task's report, labelled or judged by exact match.
    ({"accuracy": 0.8, "macro_f1": 0.75, "exact_match": 0.7}, ("macro-F1", 0.75)),
    ({"accuracy": None, "macro_f1": None, "exact_match": 0.4}, ("exact match", 0.4)),
    ({"kind": "json", "score": None}, (None, None)),
    ({}, (None, None)),
])
def test_the_golden_score_is_the_task_headline_with_its_name(
        report: dict[str, Any], expected: tuple[str | None, float | None]) -> None:
    assert golden_score(report) == expected


def _task_store(tmp_path: Path) -> Store:
    """A json, a text and a label version, and one trained without a golden set that
    passed its offline gate."""
    store = Store(tmp_path / "tuneloop.duckdb")
    with store.connect() as con:
        _publish(con, tmp_path, "json", JSON_GOLDEN)
        _publish(con, tmp_path, "text", TEXT_GOLDEN)
        _publish(con, tmp_path, "label", {"accuracy": 0.8, "macro_f1": 0.75})
        gated = _publish(con, tmp_path, "gated", None)
        record_decision(con, Decision("offline", gated, None, "pass", [], {"golden_score": {
            "metric": "chrF", "incumbent": 0.5, "candidate": 0.64}}), None)
    return store


def test_each_version_shows_its_task_golden_score(tmp_path: Path) -> None:
    figures = read_store_figures(_task_store(tmp_path))
    lines = {a.version: (a.golden_metric, a.golden_score, a.promoted_score)
             for a in figures.adapters}
    assert lines == {"v1": ("field F1", 0.5, None),
                     "v2": ("chrF", pytest.approx(TEXT_GOLDEN["score"]), None),
                     "v3": ("macro-F1", 0.75, None), "v4": (None, None, 0.64)}
    doc = json.loads(json.dumps(_report(figures).to_json(), default=str))
    json_line = next(a for a in doc["adapters"] if a["version"] == "v1")
    assert (json_line["golden_metric"], json_line["golden_score"]) == ("field F1", 0.5)
    assert json_line["golden_accuracy"] is None and json_line["golden_macro_f1"] is None
    with console.capture() as captured:
        render_status(_report(figures))
    text = captured.get()
    for fragment in ("golden score", "field F1 0.500", f"chrF {TEXT_GOLDEN['score']:.3f}",
                     "macro-F1 0.750 (acc 0.800)", "gate 0.640"):
        assert fragment in text, fragment
