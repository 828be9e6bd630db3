"""The retrain flow on a real Prefect server: it publishes once per run key, records its
decisions, and continues from the production adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.canary_store import list_decisions
from services.registry import list_adapters, promote, verify_adapter
from services.settings import Settings
from services.store import Store
from tests.integration.test_training import training_settings, write_banking77_version

pytestmark = pytest.mark.integration
__all__ = ["training_settings"]  # the session fixture, shared with test_training


def test_rerun_of_the_same_flow_run_does_not_train_twice(
    prefect_server: str, training_settings: Settings, tmp_path: Path
) -> None:
    from flows.retrain import retrain

    settings = training_settings
    store = Store(settings.db_path)
    write_banking77_version(store, "b77-flow", train_per_intent=2, val_per_intent=1,
                            golden_per_intent=1)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "rank: 8\nalpha: 16\nmax_steps: 3\nbatch_size: 2\neval_interval: 3\n"
        "eval_max_examples: 4\ngeneration_max_new_tokens: 4\ntask_eval_max_examples: 4\n"
    )
    first = retrain(dataset_version="b77-flow", config_file=str(config), run_key="flow-rerun",
                    settings=settings)
    result_file = settings.runs_dir / "flow-rerun" / "result.json"
    trained_at = result_file.stat().st_mtime_ns
    second = retrain(dataset_version="b77-flow", config_file=str(config), run_key="flow-rerun",
                     settings=settings)

    assert second["version"] == first["version"]
    assert result_file.stat().st_mtime_ns == trained_at  # no second training
    with store.connect() as con:
        mine = [a for a in list_adapters(con) if a.run_key == "flow-rerun"]
    assert len(mine) == 1 and mine[0].state == "candidate"
    manifest = verify_adapter(Path(mine[0].path), mine[0].sha256)
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
                    settings=settings)
    assert third["metrics"]["training"]["continued_from"] == first["path"]
