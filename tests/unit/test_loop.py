"""The loop's own parts: replay that keeps every label, the retrain guard on a real store
(its pure rules: test_loop_policy), the supervisor, the loop's Prometheus figures, the
demo's settings file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from tuneloop.runtime.settings import CurationSettings, Settings
from tuneloop.services.canary.core import INFO, Check, Decision
from tuneloop.services.canary.store import record_decision
from tuneloop.services.curation import core as cur
from tuneloop.services.curation.core import Example, GoldenIndex
from tuneloop.services.loop.metrics import LoopCollector, count_decision, record
from tuneloop.services.loop.policy import why_not_retrain
from tuneloop.services.loop.store import read_snapshot
from tuneloop.services.store.database import AnyStore, Store


def _example(i: int, label: str) -> Example:
    return Example(f"e{i}", f"ev{i}", label, [{"role": "user", "content": f"q {i} {label}"},
                                               {"role": "assistant", "content": label}],
                   f"q {i} {label}", label)


def test_replay_keeps_every_label_of_the_previous_version() -> None:
    # 40 labels, very unequal: a plain random 20% share would miss many of them.
    previous = [_example(i, f"intent{j}") for j in range(40) for i in range(100 * j, 100 * j
                                                                                + (60 if j < 5 else 9))]
    picked = cur.replay(previous, 100, CurationSettings(replay_share=0.2, replay_per_label=8),
                        set(), GoldenIndex())
    per_label = Counter(e.label for e in picked)
    assert len(per_label) == 40 and min(per_label.values()) == 8
    assert len(picked) == 320  # the floor (8 x 40) is above the share (25)
    # The default floor (4 per label) on the same data.
    default = Counter(e.label for e in cur.replay(previous, 100, CurationSettings(), set(),
                                                   GoldenIndex()))
    assert len(default) == 40 and min(default.values()) == 4
    # Without a floor, the share decides the size, still spread over labels.
    plain = cur.replay(previous, 100, CurationSettings(replay_share=0.2, replay_per_label=0),
                       set(), GoldenIndex())
    assert len(plain) == 25 and len({e.label for e in plain}) == 25


def _adapter(store: Store, version: str, state: str, dataset: str | None = None,
             alias: str = "support-bot") -> None:
    with store.connect() as con:
        con.execute("INSERT INTO adapters (version, name, alias, created_at, base_model, "
                    "base_hash, path, sha256, metrics, state, dataset_version) VALUES (?, ? || "
                    "'-' || ?, ?, now(), 'b', 'h', '/x', 's', '{}', ?, ?)",
                    [version, alias, version, alias, state, dataset])


def why_not(store: AnyStore, settings: Settings, run_key: str) -> str | None:
    """The retrain flow's guard: the snapshot of the store, then the policy."""
    snapshot = read_snapshot(store, settings.serving.alias, run_key)
    return why_not_retrain(snapshot, datetime.now(UTC), settings.loop)


def test_an_automatic_retrain_waits_for_a_running_one_the_canary_and_the_cooldown(
        tmp_path: Path, any_store: AnyStore) -> None:
    settings = Settings(home=tmp_path)
    store = any_store
    assert why_not(store, settings, "a") is None

    def decide(verdict: str, key: str) -> None:
        with store.connect() as con:
            record_decision(con, Decision("retrain", None, None, verdict,
                                          [Check("trigger", INFO, None, None, "", "test")],
                                          {"run_key": key}), None)

    decide("start", "a")
    assert "still running" in (why_not(store, settings, "c") or "")
    # The same retrain run again after a worker crash goes on.
    assert why_not(store, settings, "a") is None
    decide("trained", "a")
    assert "cool-down" in (why_not(store, settings, "c") or "")
    cooled = settings.model_copy(update={"loop": settings.loop.model_copy(
        update={"cooldown_s": 0})})
    assert why_not(store, cooled, "c") is None
    decide("start", "b")
    decide("failed", "b")
    assert why_not(store, cooled, "c") is None
    # A retrain whose curation found nothing new ends skipped: nothing is left running.
    decide("start", "n")
    decide("skipped", "n")
    assert why_not(store, cooled, "c") is None
    _adapter(store, "v8", "candidate")
    # A new candidate waits for the canary's first verdict before another retrain starts.
    assert "v8 is waiting for the canary" in (why_not(store, cooled, "c") or "")
    with store.connect() as con:
        record_decision(con, Decision("offline", "v8", None, "reject",
                                      [Check("golden", INFO, None, None, "", "worse")], {}), None)
    assert why_not(store, cooled, "c") is None

    def look(figures: dict[str, float]) -> None:
        with store.connect() as con:
            record_decision(con, Decision("offline", "v8", None, "hold", [Check(
                "improvement", INFO, None, None, "", "inconclusive")], figures), None)

    # Its latest offline look asks to look again later: the loop waits for that look.
    look({"next_look_at": time.time() + 600})
    assert "v8 is waiting for more labelled events" in (why_not(store, cooled, "c") or "")
    look({})
    assert why_not(store, cooled, "c") is None
    # Another alias's canary is not this alias's business.
    _adapter(store, "v9", "canary", alias="other-bot")
    assert why_not(store, cooled, "c") is None
    _adapter(store, "v10", "canary")
    assert "v10 is still in its live window" in (why_not(store, cooled, "c") or "")


def test_the_supervisor_restarts_a_dying_component_and_stops_on_sigterm(tmp_path: Path) -> None:
    child = [sys.executable, "-c", "import time, sys; time.sleep(0.3); sys.exit(3)"]
    code = ("import sys; from pathlib import Path; from tuneloop.infra.supervisor import supervise; "
            f"sys.exit(supervise('comp', {child!r}, Path({str(tmp_path)!r})))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[2],
                            env={**os.environ})
    state_file = tmp_path / "run" / "comp-supervisor.json"
    deadline = time.monotonic() + 30
    state: dict = {}
    while time.monotonic() < deadline:
        if state_file.exists():
            state = json.loads(state_file.read_text())
            if state["restarts"] >= 2:
                break
        time.sleep(0.1)
    assert state["restarts"] >= 2 and state["last_exit"] == 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def _dead(pid: int) -> bool:
    try:  # a zombie nobody reaped yet is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def test_a_supervised_worker_takes_its_process_group_with_it(tmp_path: Path) -> None:
    # The child starts a grandchild (as the worker starts a flow-run process) and dies.
    grandchild_pid = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
              "'import time; time.sleep(600)']); "
              f"open({str(grandchild_pid)!r}, 'w').write(str(p.pid)); time.sleep(0.5)")
    code = ("import sys; from pathlib import Path; from tuneloop.infra.supervisor import supervise; "
            f"sys.exit(supervise('worker', {[sys.executable, '-c', script]!r}, "
            f"Path({str(tmp_path)!r}), own_group=True))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[2],
                            env={**os.environ})
    try:
        deadline = time.monotonic() + 30
        first = None
        while time.monotonic() < deadline and first is None:
            if grandchild_pid.exists() and grandchild_pid.read_text():
                first = int(grandchild_pid.read_text())
            time.sleep(0.05)
        assert first is not None
        state_file = tmp_path / "run" / "worker-supervisor.json"
        while time.monotonic() < deadline:
            if state_file.exists() and json.loads(state_file.read_text())["restarts"] >= 1:
                break
            time.sleep(0.05)
        assert json.loads(state_file.read_text())["restarts"] >= 1
        # The first grandchild died with its parent's group, before the restart.
        while time.monotonic() < deadline and not _dead(first):
            time.sleep(0.05)
        assert _dead(first)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_loop_figures_reach_prometheus(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ingest-status.json").write_text(json.dumps(
        {"pid": 1, "started_at": "x", "inserted": 1200, "dead_letters": 3, "duplicates": 2,
         "events_per_min": 480.0, "lag": 17}))
    record(tmp_path, "drift", score=0.42, drifted=True)
    record(tmp_path, "retrain", seconds=321.5)
    count_decision(tmp_path, "live", "promote")
    count_decision(tmp_path, "live", "promote")
    registry = CollectorRegistry()
    registry.register(LoopCollector(tmp_path))
    text = generate_latest(registry).decode()
    for line in ("tuneloop_ingest_inserted_total 1200.0", "tuneloop_ingest_lag 17.0",
                 "tuneloop_ingest_events_per_minute 480.0", "tuneloop_drift_score 0.42",
                 "tuneloop_drift_detected 1.0",
                 'tuneloop_flow_last_duration_seconds{flow="retrain"} 321.5',
                 'tuneloop_loop_decisions_total{stage="live",verdict="promote"} 2.0'):
        assert line in text, line


def test_the_demo_settings_file_overlays_the_users_and_loads() -> None:
    from tuneloop.runtime.settings import load_settings
    from tuneloop.services.demo.scenario import SMALL, merge, to_toml

    user = {"kafka": {"topic": "mine"}, "canary": {"alpha": 0.01, "window_s": 999}}
    text = to_toml(merge(user, SMALL.settings))
    parsed = tomllib.loads(text)
    assert parsed["kafka"]["topic"] == "mine" and parsed["canary"]["alpha"] == 0.01
    assert parsed["canary"]["window_s"] == SMALL.settings["canary"]["window_s"]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"demo-{os.getpid()}.toml"
    path.write_text(text)
    old = os.environ.get("TUNELOOP_CONFIG")
    os.environ["TUNELOOP_CONFIG"] = str(path)
    try:
        loaded = load_settings()
    finally:
        if old is None:
            os.environ.pop("TUNELOOP_CONFIG")
        else:
            os.environ["TUNELOOP_CONFIG"] = old
        path.unlink()
    assert loaded.loop.retrain_min_new_labels == 0 and loaded.curation.split == (0.7, 0.1, 0.2)


def test_an_automatic_retrain_waits_for_enough_examples_of_a_new_label(
        tmp_path: Path, any_store: AnyStore) -> None:
    from tuneloop.services.demo.banking77 import Query, to_events
    from tuneloop.services.ingest.store import insert_events

    settings = Settings(home=tmp_path)
    store = any_store
    queries = [Query(f"old question {i}", "known") for i in range(5)] + \
        [Query(f"new question {i}", "unheard") for i in range(3)]
    with store.connect() as con:
        insert_events(con, list(to_events(queries, seed=1)))
        con.execute("INSERT INTO dataset_examples VALUES ('ds-0001', 'x1', 'train', NULL, "
                    "'known', '[]', 'p', 'known')")
    _adapter(store, "v1", "production", dataset="ds-0001")
    # 'unheard' has 3 labelled examples of the 20 a new label needs; 'known' is not new.
    reason = why_not(store, settings, "k") or ""
    assert "unheard (3/20)" in reason and "known" not in reason

    def loop(**update: int) -> Settings:
        return settings.model_copy(update={"loop": settings.loop.model_copy(update=update)})

    assert why_not(store, loop(min_examples_per_new_label=3), "k") is None
    assert why_not(store, loop(min_examples_per_new_label=0), "k") is None
    # A label that stays rare past the patience no longer holds the loop back.
    assert why_not(store, loop(new_label_wait_s=0), "k") is None
    # A held candidate's version took those 3; the next version carries them, so they
    # still count with the 2 that came after.
    with store.connect() as con:
        seq = con.execute("SELECT max(seq) FROM feedback").fetchall()[0][0]
        con.execute("INSERT INTO datasets (version, created_at, content_hash, parent_versions, "
                    "filters, report, n_train, n_validation, n_test) "
                    "VALUES ('ds-0002', now(), 'h', '[]', ?, '{}', 1, 0, 0)",
                    [json.dumps({"considered_through_seq": seq})])
        insert_events(con, list(to_events([Query(f"later question {i}", "unheard")
                                           for i in range(2)], seed=2)))
    assert "unheard (5/20)" in (why_not(store, settings, "k") or "")


def test_the_snapshot_reads_productions_promotion_and_the_newest_drift_check(
        tmp_path: Path) -> None:
    """The stale-alarm guard's inputs come from the registry and the drift reports."""
    from tuneloop.services.registry.store import promote

    settings = Settings(home=tmp_path)
    store = Store(settings.db_path)
    _adapter(store, "v1", "candidate")
    with store.connect() as con:
        con.execute("INSERT INTO drift_reports VALUES ('r1', now() - INTERVAL 1 MINUTE, 'ref', "
                    "'cur', 100, 100, 0.3, 0.001, true, '{}', '[]')")
        promote(con, "v1", "production", "better on golden")
    alarm_first = read_snapshot(store, settings.serving.alias, "k", drift_triggered=True)
    assert alarm_first.production is not None and alarm_first.production.version == "v1"
    assert alarm_first.last_check is not None and alarm_first.last_check.drifted
    reason = why_not_retrain(alarm_first, datetime.now(UTC), settings.loop)
    assert "production changed to v1" in (reason or "")
