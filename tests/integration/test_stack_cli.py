"""The operator's view: ``tuneloop up``, traffic, the unattended ingest deployment, ``status``, ``down``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.processes import free_port

pytestmark = pytest.mark.integration


def _cli(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuneloop.cli.main", *args], env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_up_replay_unattended_ingest_status_down(tmp_path: Path) -> None:
    prefect_port = free_port()
    env = {
        **os.environ,
        "TUNELOOP_HOME": str(tmp_path / "home"),
        "TUNELOOP_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "TUNELOOP_PREFECT__PORT": str(prefect_port),
        "TUNELOOP_PREFECT__API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "TUNELOOP_INGEST__INTERVAL_S": "5",
        # The session's one gateway + vLLM (tests/conftest.py) covers serving.
        "TUNELOOP_SERVING__EMBEDDED": "false",
        "COLUMNS": "120",
    }
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

        # Nobody runs ingest by hand: the served deployment picks the events up.
        deadline = time.monotonic() + 240
        report: dict = {}
        while time.monotonic() < deadline:
            status = _cli(env, "status", "--json")
            assert status.returncode == 0, status.stderr
            report = json.loads(status.stdout)
            lag = [t["lag"] for t in report["topics"] if t["topic"] == "feedback.v1"]
            # Offsets are committed after the write, so the lag reaches 0 just after the rows land.
            if report["counts"].get("feedback") == 400 and lag and not any(lag):
                break
            time.sleep(3)
        assert report["counts"]["feedback"] == 400
        health = {h["component"]: h["ok"] for h in report["health"]}
        assert health == {"kafka": True, "prefect": True, "ingest worker": True, "gateway": False}
        lag = [t["lag"] for t in report["topics"] if t["topic"] == "feedback.v1"]
        assert lag and all(x == 0 for x in lag)

        human = _cli(env, "status")
        for fragment in ("kafka", "prefect", "ingest worker", "feedback.v1", "dead_letters"):
            assert fragment in human.stdout
    finally:
        down = _cli(env, "down")
    assert down.returncode == 0
    assert "broker" in down.stdout and "prefect" in down.stdout
