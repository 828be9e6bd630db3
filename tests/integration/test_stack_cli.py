"""The operator's view: ``tuneloop up``, traffic, the long-running supervised ingest,
``status``, ``down``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.stack_env import own_stack_env
from tuneloop.training.base_model import BaseModel
from tuneloop.training.config import DEFAULT_CONFIG

pytestmark = pytest.mark.integration


def _cli(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuneloop.cli.main", *args], env=env, text=True,
                          capture_output=True, timeout=timeout)


def _wait_for_feedback(env: dict[str, str], n: int, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    report: dict = {}
    while time.monotonic() < deadline:
        status = _cli(env, "status", "--json")
        report = json.loads(status.stdout)
        lag = [t["lag"] for t in report["topics"] if t["topic"] == "feedback.v1"]
        ingest = report.get("ingest") or {}
        # Offsets are committed after the write, so the lag reaches 0 just after the rows land;
        # the ingest's own figures follow within ingest.interval_s.
        if report["counts"].get("feedback") == n and lag and not any(lag) and \
                ingest.get("lag") == 0 and ingest.get("inserted", 0) >= n:
            break
        time.sleep(3)
    return report


def _endless_recipe(directory: Path) -> Path:
    """The shipped recipe with more steps than the test lasts: the retrain is still
    training when `down` comes."""
    import yaml

    recipe = {**yaml.safe_load(DEFAULT_CONFIG.read_text()), "max_steps": 1_000_000}
    path = directory / "endless.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_up_replay_unattended_ingest_status_down(tmp_path: Path, tiny_base: BaseModel) -> None:
    env = own_stack_env(
        tmp_path / "home", TUNELOOP_INGEST__INTERVAL_S="5",
        # The session's one gateway + vLLM (tests/conftest.py) covers serving.
        TUNELOOP_SERVING__EMBEDDED="false", COLUMNS="120",
        # The retrain in flight at `down` trains a tiny random model: what is tested is
        # that `down` ends it, not what it learns.
        TUNELOOP_TRAINING__BASE_MODEL=tiny_base.path,
        TUNELOOP_TRAINING__CONFIG=str(_endless_recipe(tmp_path)))
    up = _cli(env, "up")
    try:
        assert up.returncode == 0, up.stderr
        replay = _cli(env, "replay", "banking77", "--limit", "400", "--pii-share", "0.1")
        assert replay.returncode == 0, replay.stderr
        assert "delivered 400 events" in replay.stdout

        bad = tmp_path / "events.jsonl"
        bad.write_text('{"schema_version": 1}\nnot json\n')
        emitted = _cli(env, "emit", str(bad))
        assert emitted.returncode == 1
        assert "events.jsonl:1" in emitted.stderr and "events.jsonl:2" in emitted.stderr

        # Nobody runs ingest by hand: the stack's long-running ingest lands the events.
        report = _wait_for_feedback(env, 400)
        assert report["counts"]["feedback"] == 400
        health = {h["component"]: h["ok"] for h in report["health"]}
        # The gateway is down here (this test starts no serving), so status says so.
        assert health == {"kafka": True, "prefect": True, "worker": True, "ingest": True,
                          "gateway": False}
        lag = [t["lag"] for t in report["topics"] if t["topic"] == "feedback.v1"]
        assert lag and all(x == 0 for x in lag)
        assert report["ingest"]["inserted"] >= 400 and report["ingest"]["lag"] == 0

        human = _cli(env, "status")
        assert human.returncode == 1  # a component is down
        for fragment in ("kafka", "prefect", "worker", "ingest", "events/min", "feedback.v1",
                         "dead_letters", "recent flow runs"):
            assert fragment in human.stdout, fragment

        # The consumer dies hard: its supervisor starts another, which takes over the group.
        home = Path(env["TUNELOOP_HOME"])
        child = json.loads((home / "run" / "ingest-supervisor.json").read_text())["child_pid"]
        os.kill(child, signal.SIGKILL)
        replay = _cli(env, "replay", "banking77", "--limit", "200", "--seed", "9")
        assert replay.returncode == 0, replay.stderr
        report = _wait_for_feedback(env, 600)
        assert report["counts"]["feedback"] == 600
        state = json.loads((home / "run" / "ingest-supervisor.json").read_text())
        assert state["restarts"] == 1 and state["child_pid"] not in (None, child)

        # A retrain in flight on the worker when `down` comes: its flow run (in a session
        # of its own) once outlived the worker's supervisor, training on.
        _start_retrain_on_the_worker(env)
        _wait_for_training(home)
    finally:
        down = _cli(env, "down", timeout=300)
    assert down.returncode == 0, down.stderr
    assert "broker" in down.stdout and "prefect" in down.stdout
    from tuneloop.runtime.processes import processes_of_home

    assert processes_of_home(home) == []  # not one tuneloop process of this home is left


def _start_retrain_on_the_worker(env: dict[str, str]) -> None:
    code = ("from prefect.deployments import run_deployment; "
            "run_deployment('retrain/loop', parameters={'reason': 'in flight at down'}, "
            "timeout=0)")
    started = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True,
                             timeout=120, env={**env, "PREFECT_API_URL": env[
                                 "TUNELOOP_PREFECT__API_URL"]})
    assert started.returncode == 0, started.stderr


def _wait_for_training(home: Path, timeout_s: float = 300) -> None:
    """Until a flow-run process of this home has its training recipe imported and running
    (its run directory exists under <home>/runs)."""
    from tuneloop.runtime.processes import processes_of_home

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = home / "runs"
        if runs.is_dir() and any(runs.iterdir()) and len(processes_of_home(home)) > 4:
            time.sleep(5)  # into its steps
            return
        time.sleep(2)
    raise AssertionError(f"no retrain started training under {home} in {timeout_s:.0f}s")
