"""DPO: the recipe's own loop against TRL's ``DPOTrainer``, on the same pairs and steps.

Both sides start from the same fresh LoRA adapter (same seed) on the base model and run
the same number of DPO steps of ``dpo_batch_size`` pairs, with the same beta, learning
rate and data. The pairs are replies from the bundled SGD dialogues: the reply the
assistant gave (chosen) over the reply to another dialogue (rejected). Each side is timed
over its DPO steps only (model loading and tokenisation excluded), in alternating order
over two rounds, and its result is measured the same way: the share of held-out pairs
whose chosen reply gets the higher implicit reward (log-probability under the adapter
minus under the base model). Ends with ``FIGURE dpo_step_s=`` (tuneloop),
``FIGURE dpo_step_s_trl=``, ``FIGURE dpo_speedup=`` and both ranking accuracies.

TRL and ``datasets`` (the ``bench-dpo`` extra) are installed into the running
environment on the first run, as the benchmark's own dependencies.
"""

from __future__ import annotations

import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from tuneloop.bench.ingest import machine
from tuneloop.runtime.settings import Settings
from tuneloop.services.curation.preferences import PreferencePair, pair_id
from tuneloop.services.demo.task_data import bundled, load_rows
from tuneloop.training.base_model import resolve_base_model
from tuneloop.training.config import DEFAULT_CONFIG, RecipeConfig
from tuneloop.training.preference import ranking_accuracy, train_dpo


def _say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the bench's report


def _pairs(n: int, seed: int) -> list[PreferencePair]:
    rows = load_rows(bundled("sgd"), "train")
    rng = random.Random(seed)
    picked = rng.sample(rows, n)
    out = []
    for row in picked:
        other = rng.choice(rows)
        while other.target == row.target:
            other = rng.choice(rows)
        messages = [{"role": "user", "content": row.text}]
        out.append(PreferencePair(pair_id(messages, row.target, other.target), None, messages,
                                  row.target, other.target))
    return out


def _model(base_path: str, config: RecipeConfig) -> tuple[Any, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha,  # type: ignore[arg-type]
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    return tokenizer, get_peft_model(model, lora)


def _tuneloop(base_path: str, config: RecipeConfig, train: list[PreferencePair],
              held_out: list[PreferencePair]) -> tuple[float, float | None]:
    tokenizer, model = _model(base_path, config)
    cpu = torch.device("cpu")
    figures = train_dpo(model, tokenizer, train, config, device=cpu, show_progress=False)
    return figures["dpo_s"] / figures["steps"], ranking_accuracy(model, tokenizer, held_out, cpu)


def _trl(base_path: str, config: RecipeConfig, train: list[PreferencePair],
         held_out: list[PreferencePair], steps: int) -> tuple[float, float | None]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer, model = _model(base_path, config)
    rows = [{"prompt": p.messages, "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in train]
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            if not marks:
                marks.append(time.perf_counter())

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, beta=config.dpo_beta,
                         learning_rate=config.dpo_learning_rate, max_steps=steps,
                         per_device_train_batch_size=config.dpo_batch_size,
                         lr_scheduler_type="cosine", warmup_steps=0.1, save_strategy="no",
                         report_to=[], logging_steps=1, seed=config.seed, use_cpu=True,
                         gradient_checkpointing=False, disable_tqdm=True,
                         max_length=config.max_seq_len * 2)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[Clock()])
        trainer.train()
    step_s = (marks[-1] - marks[0]) / max(1, len(marks) - 1)
    return step_s, ranking_accuracy(model, tokenizer, held_out, torch.device("cpu"))


BASELINE = ("trl>=1.13", "datasets>=3")  # pyproject's bench-dpo extra


def ensure_baseline() -> None:
    """TRL and datasets in this environment, installed on the first run."""
    if all(importlib.util.find_spec(m) is not None for m in ("trl", "datasets")):
        return
    _say(f"installing the baseline ({', '.join(BASELINE)}), first run only")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *BASELINE], check=True)


def main(settings: Settings, quick: bool = False) -> None:
    ensure_baseline()
    steps = 2 if quick else 6
    config = RecipeConfig.from_file(DEFAULT_CONFIG, dpo_batch_size=8, dpo_epochs=1,
                                    max_seq_len=256)
    pairs = _pairs(steps * config.dpo_batch_size + (16 if quick else 48), seed=0)
    train = pairs[: steps * config.dpo_batch_size]
    held_out = pairs[steps * config.dpo_batch_size:]
    base = resolve_base_model(settings.training.base_model, settings.models_dir)
    load = os.getloadavg()[0]
    _say(f"DPO on {len(train)} SGD pairs ({steps} steps of {config.dpo_batch_size}), "
         f"{len(held_out)} held out; {machine()}, load {load:.2f} at the start")
    results: dict[str, list[tuple[float, float | None]]] = {"tuneloop": [], "trl": []}
    for round_ in range(2):
        order = ("tuneloop", "trl") if round_ == 0 else ("trl", "tuneloop")
        for side in order:
            got = _tuneloop(base.path, config, train, held_out) if side == "tuneloop" else \
                _trl(base.path, config, train, held_out, steps)
            results[side].append(got)
            _say(f"round {round_ + 1} {side}: {got[0]:.2f} s a step, held-out ranking "
                 f"accuracy {got[1]}")
    ours = statistics.median(s for s, _ in results["tuneloop"])
    theirs = statistics.median(s for s, _ in results["trl"])
    _say(f"FIGURE dpo_step_s={ours:.3f}")
    _say(f"FIGURE dpo_step_s_trl={theirs:.3f}")
    _say(f"FIGURE dpo_speedup={theirs / ours:.2f}")
    _say(f"FIGURE dpo_ranking_accuracy={results['tuneloop'][-1][1]}")
    _say(f"FIGURE dpo_ranking_accuracy_trl={results['trl'][-1][1]}")
