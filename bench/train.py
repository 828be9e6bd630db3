"""Training throughput: tuneloop's LoRA recipe against a plain HF ``Trainer`` + peft.

Both sides train the same base model (the converted SmolLM2-135M-Instruct), with
the same LoRA rank, alpha, target modules, learning rate and schedule, batch size,
number of steps and banking77 examples, in this one process on this machine. The
baseline is the textbook set-up: the chat template, labels masked to the answer,
``DataCollatorForSeq2Seq`` padding each batch to its longest example, the full LM
head and loss inside the model. Throughput counts real (non-padding) tokens per
second of the training loop; validation loss is the token-weighted mean over the
answer tokens of the same held-out examples, computed the same way for both.

Ends with ``FIGURE train_tokens_ratio=...``, ``FIGURE train_val_loss=...`` and
``FIGURE baseline_val_loss=...``. The GPU part (tokens/s and MFU on a ~1B Llama)
runs only where CUDA is present.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from services import banking77
from services.settings import Settings
from training.base_model import BaseModel, resolve_base_model
from training.config import DEFAULT_CONFIG, RecipeConfig
from training.data import Encoded, collate
from training.dataset import ChatExample
from training.recipe import LoRARecipe, encode_chat

log = logging.getLogger(__name__)


def examples(n_intents: int, per_intent: int, split: str, seed: int) -> list[ChatExample]:
    names = sorted(banking77.intents())[:n_intents]
    pool = banking77.select(banking77.load(split), names, seed=seed)
    picked: list[ChatExample] = []
    for intent in names:
        for i, q in enumerate([q for q in pool if q.intent == intent][:per_intent]):
            chat = [m.model_dump() for m in banking77.chat(q.text)]
            chat.append({"role": "assistant", "content": q.intent})
            picked.append(ChatExample(f"{split}-{intent}-{i}", tuple(chat), q.intent, q.intent))
    return picked


def run_recipe(config: RecipeConfig, base: BaseModel, train: Sequence[ChatExample],
               validation: Sequence[ChatExample], workdir: Path) -> dict[str, float]:
    recipe = LoRARecipe(config, base, workdir / "recipe", run_id="bench", show_progress=False)
    recipe.setup(train, validation)
    result = recipe.train()
    recipe.cleanup()
    return {"tokens_per_s": result.tokens_per_s, "val_loss": result.best_val_loss,
            "initial_val_loss": result.initial_val_loss, "train_s": result.train_s,
            "tokens": result.train_tokens}


class _CountingCollator:
    """``DataCollatorForSeq2Seq`` that also counts the real tokens it hands out."""

    def __init__(self, tokenizer: Any) -> None:
        from transformers import DataCollatorForSeq2Seq

        self.inner = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        self.tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.inner(features)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def run_baseline(config: RecipeConfig, base: BaseModel, train: Sequence[ChatExample],
                 validation: Sequence[ChatExample], workdir: Path) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    dense = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    model = get_peft_model(dense, LoraConfig(
        r=config.rank, lora_alpha=config.alpha,  # type: ignore[arg-type]
        lora_dropout=config.dropout, target_modules=list(config.target_modules),
        task_type="CAUSAL_LM"))
    encoded = [encode_chat(tokenizer, e.messages) for e in train]
    # A list of features is a map-style dataset to the Trainer's DataLoader.
    data = [{"input_ids": list(e.input_ids), "labels": list(e.labels),
             "attention_mask": [1] * len(e)} for e in encoded]
    collator = _CountingCollator(tokenizer)
    args = TrainingArguments(
        output_dir=str(workdir / "baseline"), per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum_steps, max_steps=config.max_steps or 1,
        learning_rate=config.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio, max_grad_norm=config.max_grad_norm,
        weight_decay=config.weight_decay, logging_steps=10**6, save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        seed=config.seed, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data,
                       data_collator=collator)
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    val = [encode_chat(tokenizer, e.messages) for e in validation]
    return {"tokens_per_s": collator.tokens / train_s, "val_loss": _plain_val_loss(model, val),
            "train_s": train_s, "tokens": collator.tokens}


@torch.no_grad()
def _plain_val_loss(model: Any, val: Sequence[Encoded]) -> float:
    """Token-weighted loss over answer tokens through the model's own forward and loss."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(val), 16):
        chunk = val[start:start + 16]
        batch = collate(chunk, 0, packing=False, capacity=10**6)
        labels = torch.full_like(batch.input_ids, -100)
        for row, example in enumerate(chunk):
            labels[row, : len(example)] = torch.tensor(example.labels)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    labels=labels)
        n = int((labels[:, 1:] != -100).sum())
        total += float(out.loss) * n
        count += n
    return total / count


def main(settings: Settings, quick: bool = False) -> dict[str, float]:
    """Run both sides and print FIGURE lines; returns the figures."""
    steps, batch = (6, 8) if quick else (24, 8)
    base = resolve_base_model(settings.training.base_model, settings.models_dir)
    train = examples(12, 20, "train", seed=0)
    validation = examples(12, 4, "test", seed=1)
    config = RecipeConfig.from_file(
        DEFAULT_CONFIG, max_steps=steps, batch_size=batch, learning_rate=1e-3,
        warmup_ratio=0.05, eval_interval=10**6, eval_max_examples=len(validation),
    )
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-train-") as tmp:
        workdir = Path(tmp)
        baseline = run_baseline(config, base, train, validation, workdir)
        ours = run_recipe(config, base, train, validation, workdir)
    from rich.console import Console
    from rich.table import Table

    table = Table("side", "tokens/s", "train s", "tokens", "val loss", title=(
        f"LoRA r={config.rank}, {steps} steps x {batch} examples, {torch.get_num_threads()} "
        "CPU threads" if not torch.cuda.is_available() else "CUDA"))
    for name, side in (("HF Trainer + peft", baseline), ("tuneloop recipe", ours)):
        table.add_row(name, f"{side['tokens_per_s']:.0f}", f"{side['train_s']:.1f}",
                      f"{side['tokens']:.0f}", f"{side['val_loss']:.4f}")
    Console().print(table)
    figures["train_tokens_ratio"] = ours["tokens_per_s"] / baseline["tokens_per_s"]
    figures["train_val_loss"] = ours["val_loss"]
    figures["baseline_val_loss"] = baseline["val_loss"]
    if torch.cuda.is_available():
        figures["gpu_mfu"] = gpu_mfu(quick)
    for name, value in figures.items():
        print(f"FIGURE {name}={value:.4f}")  # noqa: T201 - the bench contract
    return figures


def gpu_mfu(quick: bool) -> float:
    """Model FLOPs utilisation of the recipe's loss step on a ~1B random Llama, in bf16.

    FLOPs per token are taken as 4 x parameters (forward plus input gradients; LoRA
    needs no weight gradients of the frozen base), against the GPU's dense bf16 peak.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    peaks = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in peaks.items() if k in name), 989e12)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                      num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                      max_position_embeddings=2048)
    dense = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)  # type: ignore[call-arg]
    n_params = sum(p.numel() for p in dense.parameters())
    model = get_peft_model(dense, LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows, length = 8, 1024
    ids = torch.randint(0, cfg.vocab_size, (rows, length), device="cuda")
    steps = 5 if quick else 20
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    tokens_per_s = steps * rows * length / (time.perf_counter() - started)
    print(f"gpu {name}: {tokens_per_s:,.0f} tokens/s on a {n_params / 1e9:.2f}B Llama")  # noqa: T201
    return 4 * n_params * tokens_per_s / peak
