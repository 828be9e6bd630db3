"""The LoRA SFT recipe: one class, read top to bottom (setup, train, cleanup).

Why it is fast on a small CPU without changing what is learned:
- examples are packed into rows with restarted positions (no padding, no
  cross-example attention; see ``tuneloop/training/data.py``);
- the 49k-wide LM head runs only on the positions that carry a target (the
  assistant's answer, a few tokens of each example), not on every position: for a
  135M model the full-vocabulary projection and its softmax would otherwise be a
  large share of the step;
- a plain loop: no trainer callbacks, no per-step device syncs besides the loss.
On CUDA the forward runs under bf16 autocast; on CPU in float32 (CPUs without
bf16 units run bf16 matmuls slower, not faster).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tuneloop.runtime.settings import TaskSpec
from tuneloop.services.evaluation.metrics import EvalReport
from tuneloop.services.evaluation.tasks import Embed
from tuneloop.training.base_model import BaseModel
from tuneloop.training.checkpoint import EarlyStopping, LoopState, load_checkpoint, save_checkpoint
from tuneloop.training.config import RecipeConfig
from tuneloop.training.data import (
    IGNORE,
    Batch,
    Encoded,
    collate,
    encode_chat,
    learning_rate_at,
    micro_batches,
    steps_per_epoch,
)
from tuneloop.training.dataset import ChatExample
from tuneloop.training.evaluate import evaluate_examples
from tuneloop.training.report import Point, TrainResult, plot_curve, progress_bar

log = logging.getLogger(__name__)

class LoRARecipe:
    """LoRA fine-tuning of a causal LM on chat examples, on one device.

    >>> recipe = LoRARecipe(config, base, run_dir)
    >>> recipe.setup(train, validation)
    >>> result = recipe.train()
    >>> recipe.save_adapter(out_dir); recipe.cleanup()
    """

    def __init__(self, config: RecipeConfig, base: BaseModel, run_dir: Path, *,
                 device: str = "auto", run_id: str = "run", show_progress: bool = True,
                 init_adapter: Path | None = None,
                 on_checkpoint: Callable[[Path, int], None] | None = None) -> None:
        self.config = config
        self.on_checkpoint = on_checkpoint  # told of each checkpoint saved: directory, step
        self.init_adapter = Path(init_adapter) if init_adapter else None
        self.continued = False
        self.base = base
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self.show_progress = show_progress
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        precision = config.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.timings: dict[str, float] = {}

    # ----------------------------------------------------------------- setup
    def setup(self, train: Sequence[ChatExample], validation: Sequence[ChatExample]) -> None:
        """Load the base model and tokenizer, wrap it with LoRA, encode the data."""
        started = time.perf_counter()
        self._setup_runtime()
        self.tokenizer, self.model = self._setup_model()
        self.train_examples = self._setup_data(train, "train")
        validation_encoded = self._setup_data(validation, "validation")
        self.val_examples = validation_encoded[: self.config.eval_max_examples]
        if not self.train_examples or not self.val_examples:
            raise ValueError(f"run {self.run_id}: no train or validation example fits "
                             f"max_seq_len={self.config.max_seq_len}; raise it")
        self.optimizer = self._setup_optimizer()
        cfg = self.config
        if cfg.objective == "dpo":  # DPO alone: not one SFT step
            self.total_steps = 0
        else:
            self.total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch(
                len(self.train_examples), cfg.batch_size, cfg.grad_accum_steps)
        self.timings["setup_s"] = time.perf_counter() - started
        log.info("run %s: %d train / %d validation examples, %d steps, device %s, %s",
                 self.run_id, len(self.train_examples), len(self.val_examples),
                 self.total_steps, self.device, self.autocast_dtype or "float32")

    def _setup_runtime(self) -> None:
        if self.device.type == "cpu":
            # The cores this process may use (training.cpu_cores pins it), not the machine's.
            usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
                os.cpu_count()
            torch.set_num_threads(self.config.num_threads or usable or 1)
        torch.manual_seed(self.config.seed)

    def _setup_model(self) -> tuple[Any, Any]:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.base.path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        dtype = self.autocast_dtype or torch.float32
        model = AutoModelForCausalLM.from_pretrained(self.base.path, dtype=dtype,
                                                     attn_implementation="sdpa")
        model.config.use_cache = False
        lora = LoraConfig(
            r=self.config.rank, lora_alpha=self.config.alpha,  # type: ignore[arg-type]
            lora_dropout=self.config.dropout,
            target_modules=list(self.config.target_modules), task_type="CAUSAL_LM",
        )
        if self.init_adapter is not None and self._can_continue_from(self.init_adapter, lora):
            from peft import PeftModel

            # Continued training: start from an adapter (production's) instead of zeros.
            peft_model = PeftModel.from_pretrained(model, str(self.init_adapter),
                                                   is_trainable=True).to(self.device)
            self.continued = True
            log.info("run %s: continuing from adapter %s", self.run_id, self.init_adapter)
        else:
            peft_model = get_peft_model(model, lora).to(self.device)
        peft_model.train()
        return tokenizer, peft_model

    def _can_continue_from(self, adapter: Path, lora: Any) -> bool:
        """Whether ``adapter`` was trained on this base model (by its manifest's hash, when
        it has a manifest) with this config's rank and target modules; when not, the run
        starts from zeros and says why."""
        manifest = adapter / "manifest.json"
        if manifest.is_file():
            base = json.loads(manifest.read_text()).get("base_model") or {}
            if base.get("sha256") not in (None, self.base.sha256):
                log.warning("run %s: adapter %s was trained on base model %s (sha256 %.12s), "
                            "not on %s (sha256 %.12s); training from scratch", self.run_id,
                            adapter, base.get("id"), base.get("sha256"), self.base.model_id,
                            self.base.sha256)
                return False
        raw = json.loads((adapter / "adapter_config.json").read_text())
        same = raw.get("r") == lora.r and set(raw.get("target_modules") or []) == set(
            lora.target_modules)
        if not same:
            log.warning("run %s: adapter %s has rank %s on %s, not this recipe's; training "
                        "from scratch", self.run_id, adapter, raw.get("r"),
                        raw.get("target_modules"))
        return same

    def _setup_data(self, examples: Sequence[ChatExample], split: str) -> list[Encoded]:
        encoded = [encode_chat(self.tokenizer, e.messages) for e in examples]
        kept = [e for e in encoded if len(e) <= self.config.max_seq_len]
        if len(kept) < len(encoded):
            log.warning("run %s: skipped %d %s examples longer than max_seq_len=%d",
                        self.run_id, len(encoded) - len(kept), split, self.config.max_seq_len)
        return kept

    @property
    def peak_learning_rate(self) -> float:
        """``continued_learning_rate`` for a run continued from an adapter (when set),
        ``learning_rate`` otherwise."""
        cfg = self.config
        if self.continued and cfg.continued_learning_rate is not None:
            return cfg.continued_learning_rate
        return cfg.learning_rate

    def _setup_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.peak_learning_rate,
                                 weight_decay=self.config.weight_decay,
                                 fused=self.device.type == "cuda")

    # ----------------------------------------------------------------- train
    def train(self) -> TrainResult:
        """Train to ``total_steps`` or until validation loss stops improving.

        Resumes from ``run_dir/checkpoint`` when a previous attempt left one, and
        ends with the best weights (by validation loss) in the model. Raises
        ``FloatingPointError`` when the loss stops being finite.
        """
        cfg = self.config
        ckpt_dir = self.run_dir / "checkpoint"
        run = self._start(ckpt_dir)
        resumed_from, initial = run.step, run.val_curve[0].loss
        stopped_early = False
        batches = self._batches(skip=run.step * cfg.grad_accum_steps)
        with progress_bar(disable=not self.show_progress) as bar:
            task = bar.add_task("train", total=self.total_steps, completed=run.step,
                                loss=float("nan"), val=f"{run.stopper.best:.4f}", tps=0.0)
            while run.step < self.total_steps:
                t0 = time.perf_counter()
                loss_sum, tokens = self._step(run.step, batches)
                run.step += 1
                run.train_s += time.perf_counter() - t0
                run.train_tokens += tokens
                run.train_curve.append(Point(run.step, loss_sum))
                bar.update(task, completed=run.step, loss=loss_sum,
                           tps=run.train_tokens / run.train_s)
                if run.step % cfg.eval_interval and run.step != self.total_steps:
                    continue
                bar.update(task, val=f"{self._evaluate_and_save(run, loss_sum, ckpt_dir):.4f}")
                if run.stopper.should_stop:
                    stopped_early = True
                    log.info("run %s: stopping early at step %d, no improvement in %d evals",
                             self.run_id, run.step, run.stopper.bad)
                    break
        return self._finish(run, initial, resumed_from, stopped_early)

    def _start(self, ckpt_dir: Path) -> LoopState:
        """Where the loop starts: the checkpoint's state, or step 0 with the initial
        validation loss as the best so far."""
        cfg = self.config
        state = self._resume(ckpt_dir)
        val_curve = [Point(*p) for p in state["val_curve"]]
        if not val_curve:
            val_curve.append(Point(0, self.validation_loss()))
        stopper = EarlyStopping(cfg.patience, cfg.min_delta,
                                state.get("best", val_curve[0].loss), state.get("best_step", 0),
                                state["bad"])
        return LoopState(state["step"], state["train_tokens"], state["train_s"],
                         [Point(*p) for p in state["train_curve"]], val_curve, stopper,
                         state.get("best_weights") or self._trainable_copy())

    def _step(self, step: int, batches: Iterator[Batch]) -> tuple[float, int]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the step's
        training loss and the tokens it trained on."""
        cfg = self.config
        lr = learning_rate_at(step, self.total_steps, self.peak_learning_rate,
                              cfg.warmup_ratio, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum, tokens = 0.0, 0
        for _ in range(cfg.grad_accum_steps):
            batch = next(batches).to(self.device)
            loss = self._loss(batch) / cfg.grad_accum_steps
            loss.backward()
            loss_sum += float(loss.detach())
            tokens += batch.n_tokens
        torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"],
                                       cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(
                f"run {self.run_id}: loss is {loss_sum} at step {step}; lower "
                f"learning_rate={self.peak_learning_rate} or max_grad_norm")
        return loss_sum, tokens

    def _evaluate_and_save(self, run: LoopState, loss_sum: float, ckpt_dir: Path) -> float:
        """Validation loss now; keep the weights if they are the best; checkpoint."""
        val = self.validation_loss()
        run.val_curve.append(Point(run.step, val))
        if run.stopper.update(run.step, val):
            run.best_weights = self._trainable_copy()
        log.info("run %s: step %d/%d train loss %.4f val loss %.4f (best %.4f @%d)",
                 self.run_id, run.step, self.total_steps, loss_sum, val, run.stopper.best,
                 run.stopper.best_step)
        save_checkpoint(ckpt_dir, self._checkpoint_tensors(run.best_weights), self.optimizer,
                        run.to_state())
        if self.on_checkpoint is not None:
            self.on_checkpoint(ckpt_dir, run.step)
        return val

    def _finish(self, run: LoopState, initial: float, resumed_from: int,
                stopped_early: bool) -> TrainResult:
        """Load the best weights back; plot the curve; sum the run up."""
        self._load_trainable(run.best_weights)
        self.timings["train_s"] = run.train_s
        curve = plot_curve(run.train_curve, run.val_curve, self.run_dir / "training_curve.png",
                           f"LoRA r={self.config.rank} on {self.base.model_id} ({self.run_id})")
        return TrainResult(run.step, self.total_steps, stopped_early, initial, run.stopper.best,
                           run.stopper.best_step, run.train_tokens, run.train_s,
                           run.train_tokens / max(run.train_s, 1e-9), run.train_curve,
                           run.val_curve, curve, resumed_from)

    def _loss(self, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens of ``batch``."""
        inner = self.model.get_base_model()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            hidden = inner.get_decoder()(
                input_ids=batch.input_ids, position_ids=batch.position_ids,
                attention_mask=batch.attention_mask, use_cache=False,
            ).last_hidden_state  # [rows, length, d_model]
            selected = batch.targets != IGNORE
            logits = inner.get_output_embeddings()(hidden[selected])  # [n_targets, vocab]
        return F.cross_entropy(logits.float(), batch.targets[selected])

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Token-weighted mean loss over the validation examples."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        size = self.config.batch_size * 2
        for start in range(0, len(self.val_examples), size):
            batch = collate(self.val_examples[start:start + size], self._pad_id,
                            self.config.packing, self.config.max_seq_len).to(self.device)
            total += float(self._loss(batch)) * batch.n_targets
            count += batch.n_targets
        self.model.train(was_training)
        return total / max(count, 1)

    def _batches(self, skip: int) -> Iterator[Batch]:
        """Collated micro-batches over as many epochs as the steps need, after ``skip``."""
        seen = 0
        for epoch in range(10**9):
            for group in micro_batches(self.train_examples, self.config.batch_size,
                                       self.config.seed, epoch):
                seen += 1
                if seen > skip:
                    yield collate(group, self._pad_id, self.config.packing,
                                  self.config.max_seq_len)

    @property
    def _pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def _trainable_copy(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def _load_trainable(self, weights: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)

    def _checkpoint_tensors(self, best: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        current = self._trainable_copy()
        return {**{f"current.{k}": v for k, v in current.items()},
                **{f"best.{k}": v for k, v in best.items()}}

    def _resume(self, ckpt_dir: Path) -> dict[str, Any]:
        fresh = {"step": 0, "train_tokens": 0, "train_s": 0.0, "train_curve": [],
                 "val_curve": [], "bad": 0}
        loaded = load_checkpoint(ckpt_dir, self.optimizer)
        if loaded is None:
            return fresh
        tensors, state = loaded
        self._load_trainable({k[len("current."):]: v.to(self.device)
                              for k, v in tensors.items() if k.startswith("current.")})
        state["best_weights"] = {k[len("best."):]: v.to(self.device)
                                 for k, v in tensors.items() if k.startswith("best.")}
        log.info("run %s: resumed from checkpoint at step %d", self.run_id, state["step"])
        return state

    # --------------------------------------------------------------- outputs
    def evaluate(self, examples: Sequence[ChatExample], task: TaskSpec | None = None,
                 embed: Embed | None = None) -> tuple[EvalReport, list[str]]:
        """Task metrics of the current weights on ``examples`` (generation), judged as
        ``task`` asks (default: a label task with the config's answer budget); ``embed``
        gives a text task its cosine similarity."""
        cfg = self.config
        picked = list(examples)[: cfg.task_eval_max_examples]
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            return evaluate_examples(self.model, self.tokenizer, picked, task=task,
                                     max_new_tokens=cfg.generation_max_new_tokens,
                                     batch_size=cfg.generation_batch_size, embed=embed)

    def evaluate_base(self, examples: Sequence[ChatExample], task: TaskSpec | None = None,
                      embed: Embed | None = None) -> tuple[EvalReport, list[str]]:
        """Task metrics of the base model alone (the adapter disabled)."""
        with self.model.disable_adapter():
            return self.evaluate(examples, task, embed)

    def save_adapter(self, directory: Path) -> list[Path]:
        """Write the PEFT adapter (config + safetensors weights) into ``directory``."""
        self.model.save_pretrained(str(directory), safe_serialization=True)
        return sorted(p for p in Path(directory).iterdir() if p.is_file())

    def cleanup(self) -> None:
        """Free the model and optimizer; the run directory stays for inspection."""
        for name in ("model", "optimizer", "tokenizer"):
            if hasattr(self, name):
                delattr(self, name)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
