"""Every canary decision is recorded one way: a manual rollback by the CLI reaches the
decision table and the loop's metrics exactly as the canary flow's verdicts do; the
flows take plain parameters, never a secret."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneloop.runtime.processes import free_port
from tuneloop.runtime.settings import Settings
from tuneloop.services.canary.core import Decision
from tuneloop.services.canary.records import record
from tuneloop.services.canary.store import list_decisions
from tuneloop.services.loop import metrics as loop_metrics
from tuneloop.services.registry import store as registry
from tuneloop.services.store.database import AnyStore, Store


def _publish(settings: Settings, n: int) -> str:
    source = settings.home / f"peft-{n}"
    source.mkdir(parents=True)
    (source / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (source / "adapter_model.safetensors").write_bytes(f"weights {n}".encode())
    with Store.of(settings).connect() as con:
        return registry.publish_adapter(
            con, settings.adapters_dir, source, alias=settings.serving.alias,
            base_model="base", base_hash="h", dataset_version=None, run_key=None,
            details={"metrics": {}}).version


def _rollback_by_cli(home: Path, reason: str,
                     store_url: str | None) -> subprocess.CompletedProcess[str]:
    # A port nobody listens on: no gateway runs, so only the registry changes.
    env = {**os.environ, "TUNELOOP_SERVING__GATEWAY_PORT": str(free_port())}
    if store_url is not None:
        env["TUNELOOP_STORE__URL"] = store_url
    return subprocess.run([sys.executable, "-m", "tuneloop.cli.main", "--home", str(home),
                           "canary", "rollback", "--reason", reason], env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_manual_rollback_is_recorded_and_counted_like_the_flows_verdicts(
        tmp_path: Path, any_store: AnyStore) -> None:
    url = getattr(any_store, "url", None)  # the CLI below reaches the same store
    settings = Settings(home=tmp_path / "home", store={"url": url} if url else {})
    store = Store.of(settings)
    v1, v2, v3 = (_publish(settings, n) for n in range(3))
    with store.connect() as con:
        registry.promote(con, v1, "production", "first")
        registry.promote(con, v2, "production", "second")
        registry.promote(con, v3, "canary", "third, live")
    # The flow's own verdicts go through the same entry point.
    record(store, settings.home, Decision("offline", v3, v2, "pass"), "flow-run-1")

    took_canary_off = _rollback_by_cli(settings.home, "users complain", url)
    assert took_canary_off.returncode == 0, took_canary_off.stdout + took_canary_off.stderr
    rolled_production = _rollback_by_cli(settings.home, "still bad", url)
    assert rolled_production.returncode == 0, rolled_production.stderr

    with store.connect() as con:
        states = {a.version: a.state for a in registry.list_adapters(con)}
        rows = list_decisions(con, 10)
    assert states == {v1: "production", v2: "rejected", v3: "rejected"}
    manual = [(r["stage"], r["candidate"], r["incumbent"], r["verdict"], r["figures"]["reason"])
              for r in rows if r["stage"] == "manual"]
    assert manual == [("manual", v2, v1, "rollback", "still bad"),
                      ("manual", v3, v2, "rollback", "users complain")]
    counted = loop_metrics.read(settings.home)["decisions"]
    assert counted == {"offline:pass": 1, "manual:rollback": 2}


def test_the_canary_flows_take_plain_parameters_and_refuse_a_secret() -> None:
    from tuneloop.flows import canary as flows
    from tuneloop.flows.common import SecretOverride

    assert list(inspect.signature(flows.canary.fn).parameters) == ["candidate", "overrides"]
    assert list(inspect.signature(flows.check_production.fn).parameters) == ["overrides"]
    with pytest.raises(SecretOverride, match=r"serving\.admin_key"):
        flows.flow_settings({"serving.admin_key": "not here", "canary.window_s": 12})
    assert flows.flow_settings({"canary.window_s": 12}).canary.window_s == 12
