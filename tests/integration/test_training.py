"""A real LoRA run on SmolLM2 over a small banking77 dataset version, on CPU.

The base model is the bundled GGUF, converted once per machine. The run is the session's
``old`` adapter (tests/session_models.py), which the canary tests serve too: short (two
dozen steps at batch 4) but it must still lower validation loss and raise golden-set
accuracy over the base model, then publish an adapter that plain peft loads and whose
manifest verifies. Tests of mechanics (resume) use a tiny random Llama.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from tests.conftest import ServingStack
from tests.session_models import SessionAdapters
from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.demo import banking77
from tuneloop.services.registry.artifacts import verify_adapter
from tuneloop.services.registry.core import IntegrityError
from tuneloop.services.registry.store import get_adapter, history, list_adapters
from tuneloop.services.store.database import Store
from tuneloop.training.base_model import BaseModel
from tuneloop.training.config import DEFAULT_CONFIG, RecipeConfig
from tuneloop.training.pipeline import train_and_publish

pytestmark = pytest.mark.integration

INTENTS = sorted(banking77.intents())[:10]


def write_banking77_version(store: Store, version: str, *, train_per_intent: int,
                            val_per_intent: int, golden_per_intent: int) -> None:
    """A dataset version and golden set from banking77, as curation would write them."""
    pool = banking77.select(banking77.load("train"), INTENTS, seed=0)
    test_pool = banking77.select(banking77.load("test"), INTENTS, seed=1)
    rows: list[dict[str, object]] = []
    for intent in INTENTS:
        mine = [q for q in pool if q.intent == intent]
        for split, chunk in (("train", mine[:train_per_intent]),
                             ("validation", mine[train_per_intent:train_per_intent + val_per_intent])):
            for i, q in enumerate(chunk):
                rows.append(_row(f"{version}-{intent}-{split}-{i}", q, split))
    golden = [_row(f"golden-{q.intent}-{i}", q, "golden")
              for intent in INTENTS
              for i, q in enumerate([q for q in test_pool if q.intent == intent][:golden_per_intent])]
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "validation", "test")}
    examples = pa.Table.from_pylist([{**r, "version": version} for r in rows])
    golden_table = pa.Table.from_pylist(golden) if golden else None
    with store.connect() as con:
        con.execute(
            "INSERT INTO datasets (version, created_at, content_hash, parent_versions, "
            "filters, report, n_train, n_validation, n_test) "
            "VALUES (?, now(), ?, '[]', '{}', '{}', ?, ?, ?)",
            [version, f"hash-{version}", counts["train"], counts["validation"], counts["test"]],
        )
        con.register("new_examples", examples)
        con.execute("INSERT INTO dataset_examples SELECT version, example_id, split, "
                    "source_event_id, label, messages, prompt, completion FROM new_examples")
        if golden:
            con.register("new_golden", golden_table)
            con.execute("INSERT INTO golden_set SELECT example_id, now(), source_event_id, "
                        "label, messages, prompt, completion FROM new_golden "
                        "ON CONFLICT DO NOTHING")


def _row(example_id: str, q: banking77.Query, split: str) -> dict[str, object]:
    chat = [m.model_dump() for m in banking77.chat(q.text)]
    chat.append({"role": "assistant", "content": q.intent})
    return {"example_id": example_id, "split": split, "source_event_id": None, "label": q.intent,
            "messages": json.dumps(chat), "prompt": q.text, "completion": q.intent}


@pytest.fixture(scope="session")
def training_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """One home for the session's training tests, so the base model converts once."""
    return load_settings({"home": tmp_path_factory.getbasetemp() / "training-home"})


def short_config(**overrides: object) -> RecipeConfig:
    """The shipped config made short enough for a test on two CPU cores."""
    return RecipeConfig.from_file(
        DEFAULT_CONFIG,
        **{"max_steps": 24, "batch_size": 4, "learning_rate": 1e-3, "warmup_ratio": 0.05,
           "eval_interval": 8, "generation_max_new_tokens": 10, **overrides},
    )


def test_lora_run_beats_the_base_model_and_publishes_a_verified_adapter(
    session_adapters: SessionAdapters, serving_stack: ServingStack, tmp_path: Path,
) -> None:
    """The session's ``old`` adapter (SmolLM2, six banking77 intents, 24 steps): the run
    lowered validation loss, beat the base model on the golden set, and published an
    adapter whose manifest verifies and that plain peft loads."""
    settings = serving_stack.settings
    store = Store(settings.db_path)
    adapter = session_adapters.old

    training = adapter.metrics["training"]
    assert training["best_val_loss"] < training["initial_val_loss"]
    base_acc = adapter.metrics["base_golden"]["accuracy"]
    tuned_acc = adapter.metrics["golden"]["accuracy"]
    assert tuned_acc > base_acc, (base_acc, tuned_acc)
    assert adapter.metrics["golden"]["per_label"], "per-label breakdown missing"
    with store.connect() as con:
        first_move = history(con, adapter.version)[0]
    assert (first_move["from_state"], first_move["to_state"]) == (None, "candidate")

    # The run left its curve and the manifest records what made the adapter.
    run_dir = settings.runs_dir / "cn-old"
    assert (run_dir / "training_curve.png").stat().st_size > 0
    path = adapter.directory(settings.adapters_dir)
    manifest = verify_adapter(path, adapter.sha256)
    assert manifest["dataset_version"] == "cn-old"
    assert manifest["hyperparameters"]["rank"] == 16
    assert manifest["base_model"]["id"] == "smollm2-135m-instruct"
    assert set(manifest["timings"]) >= {"setup_s", "train_s", "eval_s", "total_s"}

    # Plain peft loads it onto the converted base model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(manifest["base_model_path"])
    model = PeftModel.from_pretrained(base, str(path))
    assert model.peft_config["default"].r == 16  # type: ignore[attr-defined]

    # The same run again does not train twice.
    with store.connect() as con:
        published_before = len(list_adapters(con))
    again = train_and_publish(settings, "cn-old", session_adapters.recipe["cn-old"], "cn-old",
                              show_progress=False)
    assert again.version == adapter.version
    # ... also through the CLI, which prints the adapter it found.
    from typer.testing import CliRunner

    from tuneloop.cli.main import app

    result = CliRunner().invoke(app, ["--home", str(settings.home), "train", "--dataset",
                                      "cn-old", "--run-key", "cn-old"])
    assert result.exit_code == 0, result.output
    assert adapter.version in result.output
    missing = CliRunner().invoke(app, ["--home", str(settings.home), "train", "--dataset", "nope"])
    assert missing.exit_code == 2 and "not found" in missing.output
    with store.connect() as con:
        assert get_adapter(con, adapter.version).sha256 == adapter.sha256
        assert len(list_adapters(con)) == published_before

    # A tampered weight file is refused (a copy: the session's adapter stays served).
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    weights = copy / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        verify_adapter(copy, adapter.sha256)


@pytest.mark.gpu
def test_bf16_run_on_cuda(training_settings: Settings, tmp_path: Path) -> None:
    """On CUDA the recipe trains under bf16 autocast and still lowers validation loss."""
    from tuneloop.training.base_model import resolve_base_model
    from tuneloop.training.dataset import read_dataset
    from tuneloop.training.recipe import LoRARecipe

    settings = training_settings
    store = Store(settings.db_path)
    write_banking77_version(store, "b77-gpu", train_per_intent=8, val_per_intent=2,
                            golden_per_intent=0)
    with store.connect() as con:
        splits = read_dataset(con, "b77-gpu")
    base = resolve_base_model(settings.training.base_model, settings.models_dir)
    recipe = LoRARecipe(short_config(max_steps=10, eval_interval=5), base, tmp_path,
                        device="cuda", show_progress=False)
    recipe.setup(splits.train, splits.validation)
    assert recipe.autocast_dtype is not None
    result = recipe.train()
    recipe.cleanup()
    assert result.best_val_loss < result.initial_val_loss


def crashing_after_first_checkpoint() -> type:
    """A recipe that dies at its second evaluation (initial, step 3 checkpointed, dies at
    step 6): the run is killed after its first checkpoint."""
    from tuneloop.training.recipe import LoRARecipe

    class Crashing(LoRARecipe):
        calls = 0

        def validation_loss(self) -> float:
            Crashing.calls += 1
            if Crashing.calls == 3:
                raise _CrashAfterFirstCheckpoint
            return super().validation_loss()

    return Crashing


class _CrashAfterFirstCheckpoint(Exception):
    pass


def test_a_crashed_run_resumes_from_its_checkpoint(training_settings: Settings, tiny_base: BaseModel,
                                                   tmp_path: Path) -> None:
    """Killed after its first checkpoint, a rerun continues to the same weights."""
    import torch

    from tuneloop.training.dataset import read_dataset
    from tuneloop.training.recipe import LoRARecipe

    settings = training_settings
    # A tiny random Llama with SmolLM2's tokenizer: the resume logic, not the model, is tested.
    tiny = tiny_base
    store = Store(settings.db_path)
    write_banking77_version(store, "b77-resume", train_per_intent=4, val_per_intent=1,
                            golden_per_intent=0)
    with store.connect() as con:
        splits = read_dataset(con, "b77-resume")
    config = short_config(max_steps=6, eval_interval=3, patience=10)

    def run(run_dir: Path, recipe_class: type[LoRARecipe] = LoRARecipe) -> dict[str, torch.Tensor]:
        recipe = recipe_class(config, tiny, run_dir, device="cpu", show_progress=False)
        recipe.setup(splits.train, splits.validation)
        recipe.train()
        return {n: p.detach().clone() for n, p in recipe.model.named_parameters()
                if p.requires_grad}

    Crashing = crashing_after_first_checkpoint()

    uninterrupted = run(tmp_path / "a")
    with pytest.raises(_CrashAfterFirstCheckpoint):
        run(tmp_path / "b", Crashing)
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    resumed = run(tmp_path / "b")
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=1e-5)


def test_a_cut_short_result_file_trains_the_run_again(training_settings: Settings,
                                                      tiny_base: BaseModel) -> None:
    """A ``result.json`` cut short (a crash while a version wrote it in place) does not
    break its run key for good: it is set aside and the run trains again, and the new one
    is written whole (to a temporary file, then renamed)."""
    from tuneloop.training.dataset import read_dataset
    from tuneloop.training.pipeline import RESULT, Workspace, run_dir_for, train_candidate

    store = Store(training_settings.db_path)
    write_banking77_version(store, "b77-cut", train_per_intent=2, val_per_intent=1,
                            golden_per_intent=0)
    with store.connect() as con:
        splits = read_dataset(con, "b77-cut")
    settings = load_settings({"home": training_settings.home,
                              "training.base_model": tiny_base.path})
    workspace = Workspace.of(settings)
    run_dir = run_dir_for(workspace, "rk-cut-short")
    run_dir.mkdir(parents=True)
    (run_dir / RESULT).write_text('{"run_key": "rk-cut-short", "run_dir": "')

    run = train_candidate(workspace, splits, [], short_config(max_steps=2, eval_interval=2),
                          "rk-cut-short", show_progress=False)

    assert run.run_key == "rk-cut-short" and Path(run.adapter_dir, "adapter_config.json").exists()
    assert json.loads((run_dir / RESULT).read_text())["run_key"] == "rk-cut-short"
    assert [p.name.split("-")[0] for p in run_dir.glob(f"{RESULT}.unreadable-*")] == [
        f"{RESULT}.unreadable"]
    assert not list(run_dir.glob(f".{RESULT}.*.tmp"))


def test_the_base_model_is_judged_once_per_golden_set(training_settings: Settings,
                                                      tiny_base: BaseModel,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The base model does not change between runs: its golden-set figures are computed by
    the first run and read back by the next one with the same golden set and generation
    settings; another golden set is judged afresh."""
    from tuneloop.training.dataset import read_dataset, read_golden
    from tuneloop.training.pipeline import Workspace, train_candidate
    from tuneloop.training.recipe import LoRARecipe

    store = Store(training_settings.db_path)
    write_banking77_version(store, "b77-base-once", train_per_intent=2, val_per_intent=1,
                            golden_per_intent=1)
    with store.connect() as con:
        splits = read_dataset(con, "b77-base-once")
        golden = read_golden(con)
    settings = load_settings({"home": training_settings.home,
                              "training.base_model": tiny_base.path})
    judged: list[int] = []
    real = LoRARecipe.evaluate_base

    def counting(self: LoRARecipe, examples: Any, task: Any = None, embed: Any = None) -> Any:
        judged.append(len(examples))
        return real(self, examples, task, embed)

    monkeypatch.setattr(LoRARecipe, "evaluate_base", counting)
    config = short_config(max_steps=2, eval_interval=2)
    runs = [train_candidate(Workspace.of(settings), splits, examples, config, key,
                            show_progress=False)
            for key, examples in (("rk-base-1", golden), ("rk-base-2", golden),
                                  ("rk-base-3", golden[:-1]))]
    assert judged == [len(golden), len(golden) - 1]
    assert runs[0].metrics["base_golden"] == runs[1].metrics["base_golden"]
    assert runs[2].metrics["base_golden"]["n"] == len(golden) - 1


def test_sft_then_dpo_trains_on_the_versions_preference_pairs(training_settings: Settings,
                                                               tiny_base: BaseModel) -> None:
    """``sft+dpo``: SFT on the examples, then DPO on the dataset's preference pairs (each
    correction over the wrong intent it corrected) on the same adapter: the DPO loss falls
    from log 2 (the policy starts as its reference), the held-out pairs are ranked before
    and after, and the published adapter is the trained one alone. A tiny random model:
    the mechanics are tested here; what DPO learns on SmolLM2 is measured in
    tuneloop/bench/RESULTS.md."""
    import math
    import random

    from tuneloop.runtime.settings import CurationSettings
    from tuneloop.services.curation.preferences import PreferencePair, pair_id, split_of
    from tuneloop.training.dataset import read_dataset
    from tuneloop.training.pipeline import Workspace, publish_run, train_candidate

    store = Store(training_settings.db_path)
    write_banking77_version(store, "b77-dpo", train_per_intent=2, val_per_intent=1,
                            golden_per_intent=0)
    rng = random.Random(0)
    pool = banking77.select(banking77.load("train"), INTENTS, seed=0)
    pairs = []
    for intent in INTENTS:
        for q in [q for q in pool if q.intent == intent][3:3 + 4]:  # not in the examples
            messages = [m.model_dump() for m in banking77.chat(q.text)]
            wrong = rng.choice([i for i in INTENTS if i != intent])
            pid = pair_id(messages, intent, wrong)
            pairs.append(PreferencePair(pid, None, messages, intent, wrong, "correction",
                                        split_of(pid, CurationSettings(split=(0.7, 0.0, 0.3)))))
    rows = pa.Table.from_pylist([{"version": "b77-dpo", **p.to_row()} for p in pairs])
    with store.connect() as con:
        con.register("new_pairs", rows)
        con.execute("INSERT INTO dataset_preferences SELECT version, pair_id, split, "
                    "source_event_id, source, messages, chosen, rejected FROM new_pairs")
        splits = read_dataset(con, "b77-dpo")
    assert len(splits.preferences) == len(pairs)
    settings = load_settings({"home": training_settings.home, "training.objective": "sft+dpo",
                              "training.base_model": tiny_base.path})
    config = short_config(max_steps=2, eval_interval=2, objective="sft+dpo", dpo_epochs=2,
                          dpo_batch_size=4, dpo_learning_rate=1e-3)
    workspace = Workspace.of(settings)
    run = train_candidate(workspace, splits, [], config, "rk-dpo", show_progress=False)
    figures = run.metrics["preference"]
    train_pairs = sum(p.split == "train" for p in pairs)
    assert (figures["pairs"], figures["held_out_pairs"]) == (train_pairs, len(pairs) - train_pairs)
    assert figures["steps"] == 2 * math.ceil(train_pairs / 4)
    assert figures["loss_first"] == pytest.approx(math.log(2), abs=1e-4)
    assert figures["loss"] < figures["loss_first"], figures
    assert 0 <= figures["ranking_accuracy_before"] <= 1 and 0 <= figures["ranking_accuracy_after"] <= 1
    adapter = publish_run(store, workspace, run)
    directory = adapter.directory(settings.adapters_dir)
    # One adapter: no second one (a reference copy) saved beside it.
    assert not [p for p in directory.iterdir() if p.is_dir()]
    assert (directory / "adapter_model.safetensors").is_file()
    manifest = verify_adapter(directory, adapter.sha256)
    assert manifest["hyperparameters"]["objective"] == "sft+dpo"
    assert manifest["metrics"]["preference"]["steps"] == figures["steps"]
    # ``dpo`` alone: not one SFT step, the same DPO steps on the same pairs.
    config = short_config(max_steps=2, eval_interval=2, objective="dpo", dpo_epochs=2,
                          dpo_batch_size=4, dpo_learning_rate=1e-3)
    alone = train_candidate(workspace, splits, [], config, "rk-dpo-alone", show_progress=False)
    assert (alone.metrics["training"]["steps"], alone.metrics["training"]["total_steps"]) == (0, 0)
    assert alone.metrics["preference"]["steps"] == figures["steps"]


def test_a_run_another_worker_took_over_resumes_from_the_checkpoint_in_object_storage(
        training_settings: Settings, tiny_base: BaseModel, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """store.artifacts, three training workers with homes of their own (the base model is
    read from one installed copy, as an image would hold it): the first dies after
    its first checkpoint, the second resumes from the checkpoint it fetched from the object
    store and finishes, the third finds the finished run there and does not train."""
    import signal

    from tuneloop.infra.object_store import EmbeddedObjectStore
    from tuneloop.runtime.processes import free_port
    from tuneloop.runtime.s3 import s3_client
    from tuneloop.services.registry.artifacts import sha256_file
    from tuneloop.training import pipeline
    from tuneloop.training.dataset import read_dataset

    store = Store(training_settings.db_path)
    write_banking77_version(store, "b77-moved", train_per_intent=2, val_per_intent=1,
                            golden_per_intent=0)
    with store.connect() as con:
        splits = read_dataset(con, "b77-moved")
    endpoint = f"http://127.0.0.1:{free_port()}"

    def worker(name: str) -> pipeline.Workspace:
        return pipeline.Workspace.of(load_settings({
            "home": tmp_path / name, "training.base_model": tiny_base.path,
            "training.models_dir": training_settings.models_dir,
            "store.artifacts": True, "object_store.endpoint": endpoint,
            "object_store.data_dir": tmp_path / "object-store"}))

    objects = EmbeddedObjectStore(load_settings({"home": tmp_path / "store-machine",
                                                 "store.artifacts": True,
                                                 "object_store.endpoint": endpoint}))
    objects.start()
    try:
        config = short_config(max_steps=6, eval_interval=3, patience=10)

        Crashing = crashing_after_first_checkpoint()

        with monkeypatch.context() as patch:
            patch.setattr(pipeline, "LoRARecipe", Crashing)
            with pytest.raises(_CrashAfterFirstCheckpoint):
                pipeline.train_candidate(worker("a"), splits, [], config, "rk-moved",
                                         show_progress=False)
        client = s3_client(objects.cfg)
        latest = json.loads(client.get_object(
            Bucket="tuneloop", Key="runs/rk-moved/checkpoint/LATEST.json")["Body"].read())
        assert latest["step"] == 3

        second = pipeline.train_candidate(worker("b"), splits, [], config, "rk-moved",
                                          show_progress=False)
        assert second.metrics["training"]["resumed_from_step"] == 3
        assert second.run_dir == str(tmp_path / "b" / "runs" / "rk-moved")

        third = pipeline.train_candidate(worker("c"), splits, [], config, "rk-moved",
                                         show_progress=False)
        assert third.metrics == second.metrics and third.timings == second.timings
        assert third.adapter_dir == str(tmp_path / "c" / "runs" / "rk-moved" / "adapter")
        assert not (tmp_path / "c" / "runs" / "rk-moved" / "checkpoint").exists()
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert sha256_file(Path(third.adapter_dir, name)) == sha256_file(
                Path(second.adapter_dir, name))
        assert (tmp_path / "c" / "runs" / "rk-moved" / "training_curve.png").is_file()
    finally:
        objects.process.stop(sig=signal.SIGKILL)
