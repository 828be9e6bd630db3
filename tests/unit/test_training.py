"""Pure parts of the recipe: config validation, LR schedule, label masking, packing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tuneloop.training.config import CONFIGS_DIR, ConfigError, RecipeConfig
from tuneloop.training.data import (
    IGNORE,
    Encoded,
    collate,
    encode_example,
    learning_rate_at,
    micro_batches,
    pack_rows,
)

CONFIG_FILES = sorted(CONFIGS_DIR.glob("*.y*ml")) + sorted(CONFIGS_DIR.glob("*.toml"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = RecipeConfig.from_file(path)
    assert config.rank in (8, 16, 32, 64, 128, 256)


def test_default_config_values() -> None:
    config = RecipeConfig()
    assert config.rank == 16
    assert 5e-5 <= config.learning_rate <= 2e-4
    assert 0.02 <= config.warmup_ratio <= 0.05


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("rank", 12, "rank=12"),
        ("alpha", 0, "alpha=0"),
        ("dropout", 1.0, "dropout=1.0"),
        ("target_modules", ["q_proj", "lm_head"], "lm_head"),
        ("target_modules", [], "target_modules=[]"),
        ("target_modules", ["q_proj", "q_proj"], "once"),
        ("learning_rate", 0.5, "learning_rate=0.5"),
        ("learning_rate", 0, "learning_rate=0"),
        ("weight_decay", -1.0, "weight_decay=-1.0"),
        ("warmup_ratio", 0.9, "warmup_ratio=0.9"),
        ("min_lr_ratio", 2.0, "min_lr_ratio=2.0"),
        ("epochs", 0, "epochs=0"),
        ("max_steps", 0, "max_steps=0"),
        ("batch_size", 0, "batch_size=0"),
        ("grad_accum_steps", 0, "grad_accum_steps=0"),
        ("max_seq_len", 8, "max_seq_len=8"),
        ("max_grad_norm", 0, "max_grad_norm=0"),
        ("eval_interval", 0, "eval_interval=0"),
        ("eval_max_examples", 0, "eval_max_examples=0"),
        ("patience", 0, "patience=0"),
        ("min_delta", -0.1, "min_delta=-0.1"),
        ("generation_max_new_tokens", 0, "generation_max_new_tokens=0"),
        ("generation_batch_size", 0, "generation_batch_size=0"),
        ("task_eval_max_examples", 0, "task_eval_max_examples=0"),
        ("precision", "fp16", "precision='fp16'"),
        ("num_threads", 0, "num_threads=0"),
    ],
)
def test_bad_values_are_quoted_with_a_fix(field: str, value: object, hint: str) -> None:
    with pytest.raises(ConfigError, match="invalid") as info:
        RecipeConfig.from_dict({field: value})
    assert hint in str(info.value)


def test_unknown_field_lists_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("rank: 16\nlerning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match="lerning_rate.*known fields"):
        RecipeConfig.from_file(path)


def test_toml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('rank = 8\ntarget_modules = ["q_proj", "v_proj"]\n')
    config = RecipeConfig.from_file(path, max_steps=7, learning_rate=None)
    assert (config.rank, config.max_steps, config.target_modules) == (8, 7, ("q_proj", "v_proj"))
    assert config.replace(rank=32).fingerprint() != config.fingerprint()
    with pytest.raises(ConfigError, match="rank=3"):
        config.replace(rank=3)


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    rates = [learning_rate_at(s, 100, 1e-3, 0.05, 0.1) for s in range(100)]
    assert rates[0] == pytest.approx(1e-3 / 5)
    assert rates[4] == pytest.approx(1e-3)  # last warm-up step reaches the peak
    assert all(a >= b for a, b in zip(rates[4:], rates[5:], strict=False))
    assert rates[-1] == pytest.approx(1e-4, rel=0.01)
    mid = learning_rate_at(5 + 47, 100, 1e-3, 0.05, 0.1)  # half-way through the decay
    assert mid == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert learning_rate_at(0, 10, 1e-3, 0.0, 0.0) == pytest.approx(1e-3)


def test_labels_cover_the_answer_only() -> None:
    prompt = [1, 10, 11, 12]
    full = [1, 10, 11, 12, 20, 21, 2]
    encoded = encode_example(prompt, full)
    assert encoded.labels == (IGNORE, IGNORE, IGNORE, IGNORE, 20, 21, 2)
    with pytest.raises(ValueError, match="renders the prompt differently"):
        encode_example([1, 10, 99], full)
    with pytest.raises(ValueError, match="no assistant tokens"):
        encode_example(prompt, prompt)


def test_pack_rows_first_fit_decreasing() -> None:
    rows = pack_rows([60, 50, 70, 20, 30], capacity=128)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4]
    assert all(sum([60, 50, 70, 20, 30][i] for i in row) <= 128 for row in rows)
    assert len(rows) == 2
    with pytest.raises(ValueError, match="more than capacity"):
        pack_rows([200], 128)


def _example(n_prompt: int, answer: list[int], start: int) -> Encoded:
    prompt = list(range(start, start + n_prompt))
    return encode_example(prompt, prompt + answer)


def test_packed_batch_restarts_positions_and_keeps_targets_inside_each_example() -> None:
    a, b, c = _example(3, [90, 2], 10), _example(4, [91, 92, 2], 20), _example(2, [93, 2], 30)
    batch = collate([a, b, c], pad_id=0, packing=True, capacity=12)
    assert batch.attention_mask is None
    assert batch.n_tokens == len(a) + len(b) + len(c)
    assert batch.n_targets == 2 + 3 + 2
    for row in range(batch.input_ids.shape[0]):
        positions = batch.position_ids[row].tolist()
        ids = batch.input_ids[row].tolist()
        targets = batch.targets[row].tolist()
        # Every target is the next token of the same segment (positions continue by 1).
        for t, target in enumerate(targets):
            if target != IGNORE:
                assert positions[t + 1] == positions[t] + 1
                assert ids[t + 1] == target
    learned = batch.targets[batch.targets != IGNORE].tolist()
    assert sorted(learned) == sorted([90, 2, 91, 92, 2, 93, 2])


def test_padded_batch_masks_padding() -> None:
    a, b = _example(3, [90, 2], 10), _example(5, [91, 2], 20)
    batch = collate([a, b], pad_id=0, packing=False, capacity=128)
    assert batch.input_ids.shape == (2, 7)
    assert batch.attention_mask is not None
    assert batch.attention_mask.sum().item() == len(a) + len(b)
    assert batch.targets[0, 2:].tolist() == [90, 2, IGNORE, IGNORE, IGNORE]


def test_micro_batches_depend_on_seed_and_epoch_only() -> None:
    examples = [_example(2, [i, 2], 100 + i) for i in range(10)]
    first = [[e.labels for e in mb] for mb in micro_batches(examples, 3, seed=1, epoch=0)]
    again = [[e.labels for e in mb] for mb in micro_batches(examples, 3, seed=1, epoch=0)]
    other = [[e.labels for e in mb] for mb in micro_batches(examples, 3, seed=1, epoch=1)]
    assert first == again != other
    assert len(first) == 3  # the incomplete tail is dropped
    assert len(list(micro_batches(examples[:2], 3, seed=0, epoch=0))) == 1


def test_packing_matches_separate_forward_passes() -> None:
    """Restarted positions without a mask give each example its own attention.

    transformers only reads restarts as packing when no cache is in play, hence the
    recipe's ``use_cache=False``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    config._attn_implementation = "sdpa"  # the recipe's attention
    model = LlamaForCausalLM(config).eval()
    a, b = _example(5, [90, 2], 10), _example(7, [91, 92, 2], 30)
    packed = collate([a, b], pad_id=0, packing=True, capacity=32)
    with torch.no_grad():
        hidden = model.model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                             attention_mask=None, use_cache=False).last_hidden_state[0]
        alone = [model.model(input_ids=torch.tensor([e.input_ids]),
                             use_cache=False).last_hidden_state[0]
                 for e in (b, a)]  # first-fit decreasing puts the longer example first
    torch.testing.assert_close(hidden[: len(b)], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hidden[len(b): len(b) + len(a)], alone[1], atol=1e-5, rtol=1e-4)


def test_checkpoint_round_trip_restores_weights_and_optimizer(tmp_path: Path) -> None:
    from tuneloop.training.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.randn(2, 4)).sum().backward()
    opt.step()
    weights = {n: p.detach().clone() for n, p in layer.named_parameters()}
    save_checkpoint(tmp_path / "ckpt", weights, opt, {"step": 7, "best": 0.5})
    save_checkpoint(tmp_path / "ckpt", weights, opt, {"step": 8, "best": 0.4})  # replaces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert not list((tmp_path / "ckpt").glob("*.pt"))  # no pickles, safetensors + JSON only

    fresh = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1e-3)
    loaded = load_checkpoint(tmp_path / "ckpt", fresh)
    assert loaded is not None
    tensors, state = loaded
    assert state["step"] == 8 and state["best"] == 0.4
    torch.testing.assert_close(tensors["weight"], weights["weight"])
    before, after = opt.state_dict(), fresh.state_dict()
    for index, slots in before["state"].items():
        for name, value in slots.items():
            torch.testing.assert_close(after["state"][index][name], value)
    assert load_checkpoint(tmp_path / "missing", fresh) is None


def test_early_stopping_counts_evaluations_without_a_gain() -> None:
    from tuneloop.training.checkpoint import EarlyStopping

    stopper = EarlyStopping(patience=2, min_delta=0.01, best=1.0)
    assert stopper.update(10, 0.8) and stopper.best_step == 10
    assert not stopper.update(20, 0.795)  # within min_delta: no gain
    assert not stopper.should_stop
    assert stopper.update(30, 0.5)  # a gain resets the count
    assert not stopper.update(40, 0.6) and not stopper.update(50, 0.7)
    assert stopper.should_stop and (stopper.best, stopper.best_step) == (0.5, 30)


def test_a_hub_base_model_is_pinned_by_its_cached_revision(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from tuneloop.training.base_model import resolve_base_model

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--acme--tiny-lm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "snapshots" / revision / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    base = resolve_base_model("acme/tiny-lm", tmp_path / "models")
    assert base.model_id == "acme/tiny-lm" and base.sha256 == f"revision:{revision}"
    assert Path(base.path) == repo / "snapshots" / revision
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        resolve_base_model("acme/absent", tmp_path / "models")


def test_a_continued_run_that_kept_its_starting_weights_has_nothing_to_publish() -> None:
    """Early stopping keeps the best weights; when the best is step 0 of a run continued
    from production, the candidate would be production itself."""
    from tuneloop.training.base_model import BaseModel
    from tuneloop.training.pipeline import TrainedRun, unchanged_reason

    def run(best_step: int, continued_from: str | None) -> TrainedRun:
        training = {"best_step": best_step, "continued_from": continued_from, "steps": 60,
                    "initial_val_loss": 2.0, "best_val_loss": 2.0}
        return TrainedRun("k", "/r", "/r/adapter", "ds-0002", BaseModel("m", "/m", "0"), {},
                          {"training": training}, {})

    reason = unchanged_reason(run(0, "/adapters/v1"))
    assert reason is not None
    assert "/adapters/v1" in reason and "2.0000" in reason and "60 steps" in reason
    assert unchanged_reason(run(20, "/adapters/v1")) is None  # it learned something
    assert unchanged_reason(run(0, None)) is None  # from zeros: step 0 is no adapter at all
    dpo = run(0, "/adapters/v1")
    dpo.metrics["preference"] = {"objective": "dpo", "steps": 24}
    assert unchanged_reason(dpo) is None  # DPO moved the weights SFT left alone
    dpo.metrics["preference"] = {"objective": "sft+dpo", "skipped": "no train preference pairs"}
    assert unchanged_reason(dpo) is not None


def test_a_continued_run_peaks_at_the_continued_learning_rate(tmp_path: Path) -> None:
    from tuneloop.training.base_model import BaseModel
    from tuneloop.training.recipe import LoRARecipe

    base = BaseModel("m", "/m", "0")
    plain = RecipeConfig.from_file(CONFIGS_DIR / "demo.yaml")
    assert plain.continued_learning_rate is None
    slower = plain.replace(continued_learning_rate=2e-4)
    recipe = LoRARecipe(slower, base, tmp_path, device="cpu")
    assert recipe.peak_learning_rate == plain.learning_rate  # from zeros
    recipe.continued = True  # as setup sets it when the starting adapter fits
    assert recipe.peak_learning_rate == 2e-4
    assert LoRARecipe(plain, base, tmp_path, device="cpu").peak_learning_rate == \
        plain.learning_rate
    with pytest.raises(ConfigError, match="continued_learning_rate=0.5"):
        plain.replace(continued_learning_rate=0.5)
