"""The retrain flow on a real Prefect server: it publishes once per run key, records its
decisions, and continues from the production adapter."""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.test_training import training_settings, write_banking77_version
from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.canary.store import list_decisions
from tuneloop.services.registry.artifacts import verify_adapter
from tuneloop.services.registry.store import list_adapters, promote, reject
from tuneloop.services.store.database import Store
from tuneloop.training.base_model import BaseModel

pytestmark = pytest.mark.integration
__all__ = ["training_settings"]  # the session fixture, shared with test_training


def _tiny_recipe(tmp_path: Path, **fields: int) -> Path:
    """A recipe file small enough for a test on two CPU cores."""
    values = {"rank": 8, "alpha": 16, "batch_size": 2, "eval_max_examples": 4,
              "generation_max_new_tokens": 4, "task_eval_max_examples": 4, **fields}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny.yaml"
    path.write_text("".join(f"{key}: {value}\n" for key, value in values.items()))
    return path


def _home(settings: Settings, base: BaseModel) -> dict[str, str]:
    """The flow's settings overrides: the test's state directory and the tiny base model (the
    rest comes from the environment the session set)."""
    return {"home": str(settings.home), "training.base_model": base.path}


def test_rerun_of_the_same_flow_run_does_not_train_twice(
    prefect_server: str, training_settings: Settings, tiny_base: BaseModel, tmp_path: Path
) -> None:
    """Idempotency and continuation are mechanics: a tiny random Llama trains here."""
    from tuneloop.flows.retrain import retrain

    settings = training_settings
    store = Store(settings.db_path)
    write_banking77_version(store, "b77-flow", train_per_intent=2, val_per_intent=1,
                            golden_per_intent=1)
    config = _tiny_recipe(tmp_path, max_steps=3, eval_interval=3)
    first = retrain(dataset_version="b77-flow", config_file=str(config), run_key="flow-rerun",
                    overrides=_home(settings, tiny_base))
    result_file = settings.runs_dir / "flow-rerun" / "result.json"
    trained_at = result_file.stat().st_mtime_ns
    second = retrain(dataset_version="b77-flow", config_file=str(config), run_key="flow-rerun",
                     overrides=_home(settings, tiny_base))

    assert second["version"] == first["version"]
    assert result_file.stat().st_mtime_ns == trained_at  # no second training
    with store.connect() as con:
        mine = [a for a in list_adapters(con) if a.run_key == "flow-rerun"]
    assert len(mine) == 1 and mine[0].state == "candidate"
    manifest = verify_adapter(mine[0].directory(settings.adapters_dir), mine[0].sha256)
    assert manifest["hyperparameters"]["rank"] == 8
    assert manifest["dataset_version"] == "b77-flow"
    with store.connect() as con:
        verdicts = [d["verdict"] for d in list_decisions(con, 50)
                    if d["stage"] == "retrain" and d["figures"].get("run_key") == "flow-rerun"]
    assert sorted(verdicts) == ["start", "trained"]  # the rerun decided nothing new

    # With that adapter in production, the next retrain starts from its weights.
    with store.connect() as con:
        promote(con, first["version"], "production", "test: production to continue from")
    third = retrain(dataset_version="b77-flow", config_file=str(config), run_key="continued",
                    overrides=_home(settings, tiny_base))
    assert third["metrics"]["training"]["continued_from"] == first["path"]

    # An automatic retrain at a quiet hour, no feedback since the last version: curation
    # finds nothing new, and the run ends skipped with that reason, with no version made.
    with store.connect() as con:
        reject(con, third["version"], "test: no candidate waiting for the canary")
        versions = con.execute("SELECT count(*) FROM datasets").fetchall()[0][0]
    quiet = retrain(reason="schedule", automatic=True, run_key="quiet",
                    overrides={**_home(settings, tiny_base), "loop.cooldown_s": 0})
    assert quiet["verdict"] == "skipped", quiet
    assert quiet["reason"].startswith("nothing new to learn: 0 feedback event"), quiet
    with store.connect() as con:
        verdicts = [d["verdict"] for d in list_decisions(con, 50)
                    if d["stage"] == "retrain" and d["figures"].get("run_key") == "quiet"]
        assert con.execute("SELECT count(*) FROM datasets").fetchall()[0][0] == versions
    assert sorted(verdicts) == ["skipped", "start"]

    # A continued run whose validation loss never goes below its start (here: not by the
    # min_delta of 100 a gain needs) keeps production's weights: no candidate is published
    # (the canary could only hold it), and the retrain ends skipped, saying why.
    no_gain = _tiny_recipe(tmp_path / "no-gain", max_steps=2, eval_interval=1, min_delta=100)
    same = retrain(dataset_version="b77-flow", config_file=str(no_gain), run_key="unchanged",
                   reason="schedule", automatic=True,
                   overrides={**_home(settings, tiny_base), "loop.cooldown_s": 0})
    assert same["verdict"] == "skipped", same
    assert "did not lower the validation loss below its start" in same["reason"], same
    from tuneloop.services.loop.store import last_trained_at

    with store.connect() as con:
        assert not [a for a in list_adapters(con) if a.run_key == "unchanged"]
        mine = [d for d in list_decisions(con, 50)
                if d["stage"] == "retrain" and d["figures"].get("run_key") == "unchanged"]
        trained_at = last_trained_at(con)
    assert sorted(d["verdict"] for d in mine) == ["skipped", "start"]
    skipped = next(d for d in mine if d["verdict"] == "skipped")
    # It trained: the loop's cooldown counts from it, as from a published candidate.
    assert skipped["figures"]["trained"] is True and skipped["figures"]["dataset"] == "b77-flow"
    assert trained_at == skipped["created_at"]  # the latest training


def test_a_retrain_the_worker_dies_in_resumes_from_its_checkpoint_and_publishes_once(
    prefect_server: str, training_settings: Settings, tmp_path: Path
) -> None:
    """SIGKILL of the deployment worker during a retrain: its supervisor restarts it, the
    new worker marks the run Crashed and runs it again, which goes on from the last
    checkpoint and publishes one adapter."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.deployments import run_deployment

    from tuneloop.infra.prefect_server import prefect_env
    from tuneloop.infra.stack import Stack
    from tuneloop.infra.supervisor import read_state

    settings = training_settings
    store = Store(settings.db_path)
    write_banking77_version(store, "b77-worker-kill", train_per_intent=4, val_per_intent=1,
                            golden_per_intent=1)
    config = _tiny_recipe(tmp_path, max_steps=10, eval_interval=2, patience=100)
    key = "worker-kill"
    stack = Stack(settings)
    env = {**prefect_env(settings), **stack._tuneloop_env()}
    stack.worker.start([sys.executable, "-m", "tuneloop.cli.main", "supervise", "worker"], env=env)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with get_client(sync_client=True) as client:
                try:
                    client.read_deployment_by_name("retrain/loop")
                    break
                except Exception:  # noqa: BLE001 - not registered yet
                    time.sleep(1)
        first = run_deployment("retrain/loop", timeout=0, parameters={
            "reason": "worker kill test", "dataset_version": "b77-worker-kill",
            "config_file": str(config), "run_key": key})
        checkpoint = settings.runs_dir / key / "checkpoint" / "state.json"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not checkpoint.exists():
            time.sleep(0.2)
        assert checkpoint.exists(), "the worker never reached its first checkpoint"
        worker = read_state(Path(settings.home), "worker")["child_pid"]  # type: ignore[index]
        os.kill(worker, signal.SIGKILL)

        deadline = time.monotonic() + 600
        adapter = None
        while time.monotonic() < deadline and adapter is None:
            with store.connect() as con:
                mine = [a for a in list_adapters(con) if a.run_key == key]
            adapter = mine[0] if mine else None
            time.sleep(2)
        assert adapter is not None, "the resumed retrain published nothing"
        with get_client(sync_client=True) as client:
            crashed = client.read_flow_run(first.id)
            resumed = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=["resumed"])))
            while time.monotonic() < deadline and not all(
                    r.state and r.state.is_final() for r in resumed):
                time.sleep(1)
                resumed = [client.read_flow_run(r.id) for r in resumed]
    finally:
        stack.worker.stop()
    state = read_state(Path(settings.home), "worker") or {}
    assert state.get("restarts", 0) >= 1
    assert crashed.state is not None and crashed.state.is_crashed()
    assert [r.parameters["run_key"] for r in resumed] == [key]
    assert resumed[0].state is not None and resumed[0].state.is_completed()
    training = adapter.metrics["training"]
    assert training["resumed_from_step"] >= 2  # went on from the checkpoint, not from zero
    assert training["steps"] == 10
    with store.connect() as con:
        assert len([a for a in list_adapters(con) if a.run_key == key]) == 1


def test_the_training_pool_deployment_sends_heartbeats_and_the_zombie_automation_watches_it(
        prefect_server: str, training_settings: Settings) -> None:
    """``train-adapter/<pool>`` is deployed by module path with heartbeats on, and the
    zombie automation watches that deployment's runs alone, the newest pool's after a
    rename. (That a run whose heartbeats stop is marked Crashed and resumed is
    ``bench scale``'s: it kills the training worker mid-run.)"""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from tuneloop.flows.serve import HEARTBEAT_S, ZOMBIE_AUTOMATION, register_training_pool

    pool = f"train-{uuid.uuid4().hex[:6]}"
    settings = load_settings({"home": training_settings.home, "loop.train_work_pool": pool})
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        register_training_pool(settings)
        deployment = client.read_deployment_by_name(f"train-adapter/{pool}")
    assert deployment.entrypoint == "tuneloop.flows.retrain.train_adapter"
    assert deployment.job_variables == {
        "env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}}
    automation = Automation.read(name=ZOMBIE_AUTOMATION)
    related = automation.trigger.match_related  # type: ignore[union-attr]
    watched = related[0] if isinstance(related, list) else related
    assert watched["prefect.resource.id"] in (f"prefect.deployment.{deployment.id}",
                                              [f"prefect.deployment.{deployment.id}"])

    # The pool renamed: the automation follows the new deployment, and there is one.
    renamed = f"train-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=renamed, type="process"))
        register_training_pool(load_settings({"home": training_settings.home,
                                              "loop.train_work_pool": renamed}))
        moved = client.read_deployment_by_name(f"train-adapter/{renamed}")
    automation = Automation.read(name=ZOMBIE_AUTOMATION)
    assert str(moved.id) in automation.trigger.model_dump_json()
    assert str(deployment.id) not in automation.trigger.model_dump_json()
