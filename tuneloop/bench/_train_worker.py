"""One side of ``tuneloop bench train``, in a fresh process: train, then print JSON.

``python -m tuneloop.bench._train_worker SIDE SPEC_JSON``, SIDE one of ``recipe`` (tuneloop's
LoRA recipe), ``hf`` (HF ``Trainer`` + peft) or ``trl`` (TRL ``SFTTrainer`` with BFD
packing and completion-only loss). Every side times the same scope, the optimizer
steps (forward, backward, clipping, update; the recipe's own step clock, a
``TrainerCallback`` from ``on_step_begin`` to ``on_step_end`` for the others), and
counts the real tokens it trained on. Validation loss is computed afterwards by one
function for all sides.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from tuneloop.runtime.settings import load_settings
from tuneloop.services.demo import banking77
from tuneloop.training.base_model import BaseModel, resolve_base_model
from tuneloop.training.config import DEFAULT_CONFIG, RecipeConfig
from tuneloop.training.data import Encoded, collate, encode_chat
from tuneloop.training.dataset import ChatExample
from tuneloop.training.recipe import LoRARecipe


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


def recipe_config(spec: dict[str, Any]) -> RecipeConfig:
    return RecipeConfig.from_file(
        DEFAULT_CONFIG, max_steps=spec["steps"], batch_size=spec["batch"],
        learning_rate=spec["learning_rate"], warmup_ratio=0.05, eval_interval=10**6,
        eval_max_examples=1, precision="bf16" if torch.cuda.is_available() else "fp32")


class _StepClock(TrainerCallback):
    """The seconds from each step's begin to its end."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._t0


class _Counting:
    """A data collator that also counts the real tokens it hands out."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        self.tokens += sum(len(f["input_ids"]) for f in features)
        return self.inner(features)


def _training_args(cls: Any, config: RecipeConfig, workdir: Path, batch: int,
                   **extra: Any) -> Any:
    cuda = torch.cuda.is_available()
    return cls(
        output_dir=str(workdir / "out"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=config.grad_accum_steps, max_steps=config.max_steps,
        learning_rate=config.learning_rate, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": config.min_lr_ratio},
        warmup_steps=config.warmup_ratio, max_grad_norm=config.max_grad_norm,
        weight_decay=config.weight_decay, logging_steps=10**6, save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=not cuda, bf16=cuda, seed=config.seed,
        dataloader_num_workers=0, disable_tqdm=True, **extra)


def _lora(config: RecipeConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.alpha,  # type: ignore[arg-type]
                      lora_dropout=config.dropout, target_modules=list(config.target_modules),
                      task_type="CAUSAL_LM")


def _dense(base: BaseModel) -> Any:
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype)
    return model.to("cuda") if torch.cuda.is_available() else model  # type: ignore[arg-type]


def run_recipe(config: RecipeConfig, base: BaseModel, train: Sequence[ChatExample],
               validation: Sequence[ChatExample], workdir: Path) -> dict[str, Any]:
    recipe = LoRARecipe(config, base, workdir / "recipe", run_id="bench", show_progress=False)
    recipe.setup(train, validation)
    result = recipe.train()
    loss = val_loss(recipe.model, recipe.tokenizer, validation)
    recipe.cleanup()
    return {"tokens": result.train_tokens, "train_s": result.train_s, "val_loss": loss,
            "examples_per_step": config.batch_size}


def run_hf(config: RecipeConfig, base: BaseModel, train: Sequence[ChatExample],
           validation: Sequence[ChatExample], workdir: Path) -> dict[str, Any]:
    """The textbook set-up: the chat template, labels masked to the answer,
    ``DataCollatorForSeq2Seq`` padding each batch to its longest example."""
    from peft import get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    model = get_peft_model(_dense(base), _lora(config))
    data = [{"input_ids": list(e.input_ids), "labels": list(e.labels),
             "attention_mask": [1] * len(e)} for e in (encode_chat(tokenizer, x.messages)
                                                        for x in train)]
    collator = _Counting(DataCollatorForSeq2Seq(tokenizer, padding=True,
                                                label_pad_token_id=-100))
    clock = _StepClock()
    trainer = Trainer(model=model, args=_training_args(TrainingArguments, config, workdir,
                                                       config.batch_size),
                      train_dataset=data, data_collator=collator, callbacks=[clock])
    trainer.train()
    return {"tokens": collator.tokens, "train_s": clock.seconds,
            "val_loss": val_loss(model, tokenizer, validation),
            "examples_per_step": config.batch_size}


def run_trl(config: RecipeConfig, base: BaseModel, train: Sequence[ChatExample],
            validation: Sequence[ChatExample], workdir: Path) -> dict[str, Any]:
    """What most users pick today: ``SFTTrainer`` on prompt-completion chats, BFD packing
    into rows of ``max_seq_len`` (padding-free), loss on the completion only. A step
    takes as many packed rows as hold the recipe's examples per step."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    lengths = [len(encode_chat(tokenizer, x.messages)) for x in train]
    rows = max(1, round(config.batch_size * (sum(lengths) / len(lengths)) / config.max_seq_len))
    data = Dataset.from_list([{"prompt": [dict(m) for m in x.messages[:-1]],
                               "completion": [dict(x.messages[-1])]} for x in train])
    clock = _StepClock()
    args = _training_args(SFTConfig, config, workdir, rows, packing=True,
                          packing_strategy="bfd", completion_only_loss=True,
                          max_length=config.max_seq_len)
    trainer = SFTTrainer(model=_dense(base), args=args, train_dataset=data,
                         processing_class=tokenizer, peft_config=_lora(config), callbacks=[clock])
    collator = trainer.data_collator = _Counting(trainer.data_collator)
    trainer.train()
    mean = sum(lengths) / len(lengths)
    return {"tokens": collator.tokens, "train_s": clock.seconds,
            "val_loss": val_loss(trainer.model, tokenizer, validation),
            "examples_per_step": collator.tokens / mean / max(1, config.max_steps or 1)}


@torch.no_grad()
def val_loss(model: Any, tokenizer: Any, validation: Sequence[ChatExample]) -> float:
    """Token-weighted loss over the answer tokens, through the model's own forward."""
    model.eval()
    val: list[Encoded] = [encode_chat(tokenizer, e.messages) for e in validation]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(val), 16):
        chunk = val[start:start + 16]
        batch = collate(chunk, 0, packing=False, capacity=10**6)
        labels = torch.full_like(batch.input_ids, -100)
        for row, example in enumerate(chunk):
            labels[row, : len(example)] = torch.tensor(example.labels)
        out = model(input_ids=batch.input_ids.to(device),
                    attention_mask=batch.attention_mask.to(device),  # type: ignore[union-attr]
                    labels=labels.to(device))
        n = int((labels[:, 1:] != -100).sum())
        total += float(out.loss) * n
        count += n
    return total / count


SIDES = {"recipe": run_recipe, "hf": run_hf, "trl": run_trl}


def main(side: str, spec: dict[str, Any]) -> dict[str, Any]:
    settings = load_settings()
    base = resolve_base_model(settings.training.base_model, settings.models_dir)
    train = examples(spec["intents"], spec["per_intent"], "train", seed=0)
    validation = examples(spec["intents"], 4, "test", seed=1)
    config = recipe_config(spec)
    with tempfile.TemporaryDirectory(prefix=f"tuneloop-bench-train-{side}-") as tmp:
        out = SIDES[side](config, base, train, validation, Path(tmp))
    out["tokens_per_s"] = out["tokens"] / out["train_s"]
    assert math.isfinite(out["val_loss"]), out
    return out


if __name__ == "__main__":
    result = main(sys.argv[1], json.loads(sys.argv[2]))
    print("RESULT " + json.dumps(result))  # noqa: T201 - read by tuneloop.bench.train
