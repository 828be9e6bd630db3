"""The LoRA recipe's typed config: every field documents itself and is checked.

A config comes from a YAML or TOML file (``tuneloop/training/configs/*.yaml``) plus
overrides; :meth:`RecipeConfig.__post_init__` rejects a bad value by quoting it
and saying what to use instead, so a run never starts with a config it would
trip over an hour later.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIGS_DIR / "smollm2_lora.yaml"
DEMO_CONFIG = CONFIGS_DIR / "demo.yaml"  # `tuneloop demo`'s recipe

# vLLM's runtime LoRA loading accepts these ranks (--max-lora-rank must be one of them).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256)
# Projections vLLM can apply a LoRA to in Llama-family models.
LLAMA_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRECISIONS = ("auto", "fp32", "bf16")
OBJECTIVES = ("sft", "dpo", "sft+dpo")


class ConfigError(ValueError):
    """A recipe config value is out of range; the message names it and the fix."""


@dataclass(frozen=True)
class RecipeConfig:
    """Hyperparameters of one LoRA SFT run.

    Fields are grouped as in torchtune recipes: adapter, optimiser and schedule,
    batching, evaluation and stopping, runtime.
    """

    rank: int = field(default=16, metadata={"help": f"LoRA rank; one of {VLLM_LORA_RANKS}."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator (alpha/rank)."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout, in [0, 1)."})
    target_modules: tuple[str, ...] = field(
        default=LLAMA_LORA_MODULES,
        metadata={"help": f"Projections to adapt; a subset of {LLAMA_LORA_MODULES}."},
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak AdamW learning rate."})
    continued_learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate of a run that continues from an "
                                "adapter (production's); None: learning_rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay."})
    warmup_ratio: float = field(
        default=0.03, metadata={"help": "Share of steps with linear warm-up, then cosine decay."}
    )
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "Cosine decay floor as a share of the peak rate."}
    )
    epochs: int = field(default=1, metadata={"help": "Passes over the train split."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps; overrides epochs when set."}
    )
    batch_size: int = field(default=16, metadata={"help": "Examples per micro-batch."})
    grad_accum_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step."}
    )
    max_seq_len: int = field(
        default=128,
        metadata={"help": "Longest example in tokens (longer ones are skipped) and packed row."},
    )
    packing: bool = field(
        default=True,
        metadata={"help": "Pack examples into rows with per-example attention (no padding)."},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    eval_interval: int = field(default=20, metadata={"help": "Steps between validation losses."})
    eval_max_examples: int = field(
        default=256, metadata={"help": "Validation examples used for the loss."}
    )
    patience: int = field(
        default=3, metadata={"help": "Evaluations without improvement before stopping early."}
    )
    min_delta: float = field(
        default=0.0, metadata={"help": "Improvement in validation loss that resets patience."}
    )
    generation_max_new_tokens: int = field(
        default=16, metadata={"help": "Token budget of each answer in task evaluation."}
    )
    generation_batch_size: int = field(
        default=32, metadata={"help": "Prompts per generate() call in task evaluation."}
    )
    task_eval_max_examples: int | None = field(
        default=None, metadata={"help": "Cap on validation/golden examples generated for."}
    )
    precision: str = field(
        default="auto", metadata={"help": f"{PRECISIONS}; auto = bf16 on CUDA, fp32 on CPU."}
    )
    num_threads: int | None = field(
        default=None, metadata={"help": "CPU threads for torch; default: all available cores."}
    )
    seed: int = field(default=0, metadata={"help": "Seeds data order and LoRA init."})
    objective: str = field(
        default="sft", metadata={"help": f"{OBJECTIVES}: supervised fine-tuning on the "
                                 "examples, DPO on the dataset's preference pairs, or SFT then "
                                 "DPO on the same adapter (training.objective sets it)."})
    dpo_beta: float = field(
        default=0.1, metadata={"help": "DPO's beta: how far the policy may move from the "
                               "reference (the adapter as DPO starts)."})
    dpo_learning_rate: float = field(default=5e-5, metadata={"help": "Peak DPO learning rate."})
    dpo_epochs: int = field(default=1, metadata={"help": "DPO passes over the train pairs."})
    dpo_batch_size: int = field(default=8, metadata={"help": "Preference pairs per DPO step."})

    def __post_init__(self) -> None:
        # YAML/TOML give lists; a frozen dataclass wants a hashable tuple.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        _check(self.rank in VLLM_LORA_RANKS, "rank", self.rank,
               f"use one of {VLLM_LORA_RANKS} (the ranks vLLM can load)")
        _check(self.alpha > 0, "alpha", self.alpha, "use a positive value, e.g. 2 x rank")
        _check(0 <= self.dropout < 1, "dropout", self.dropout, "use a value in [0, 1)")
        bad = [m for m in self.target_modules if m not in LLAMA_LORA_MODULES]
        _check(bool(self.target_modules) and not bad, "target_modules", list(self.target_modules),
               f"choose a non-empty subset of {list(LLAMA_LORA_MODULES)}")
        _check(len(set(self.target_modules)) == len(self.target_modules), "target_modules",
               list(self.target_modules), "list each module once")
        _check(0 < self.learning_rate <= 1e-2, "learning_rate", self.learning_rate,
               "use a value in (0, 1e-2]; 5e-5 to 2e-4 suits LoRA")
        _check(self.continued_learning_rate is None or 0 < self.continued_learning_rate <= 1e-2,
               "continued_learning_rate", self.continued_learning_rate,
               "use a value in (0, 1e-2], or none for learning_rate")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "use a value >= 0")
        _check(0 <= self.warmup_ratio <= 0.5, "warmup_ratio", self.warmup_ratio,
               "use a value in [0, 0.5]; 0.02 to 0.05 is typical")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio,
               "use a value in [0, 1]")
        _check(self.epochs >= 1, "epochs", self.epochs, "use 1 or more")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps,
               "use 1 or more, or leave unset to train for `epochs`")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "use 1 or more")
        _check(self.grad_accum_steps >= 1, "grad_accum_steps", self.grad_accum_steps,
               "use 1 or more")
        _check(16 <= self.max_seq_len <= 32768, "max_seq_len", self.max_seq_len,
               "use a value in [16, 32768]")
        _check(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm,
               "use a positive norm, e.g. 1.0")
        _check(self.eval_interval >= 1, "eval_interval", self.eval_interval, "use 1 or more")
        _check(self.eval_max_examples >= 1, "eval_max_examples", self.eval_max_examples,
               "use 1 or more")
        _check(self.patience >= 1, "patience", self.patience, "use 1 or more evaluations")
        _check(self.min_delta >= 0, "min_delta", self.min_delta, "use a value >= 0")
        _check(self.generation_max_new_tokens >= 1, "generation_max_new_tokens",
               self.generation_max_new_tokens, "use 1 or more")
        _check(self.generation_batch_size >= 1, "generation_batch_size",
               self.generation_batch_size, "use 1 or more")
        _check(self.task_eval_max_examples is None or self.task_eval_max_examples >= 1,
               "task_eval_max_examples", self.task_eval_max_examples,
               "use 1 or more, or leave unset to evaluate every example")
        _check(self.precision in PRECISIONS, "precision", self.precision,
               f"use one of {PRECISIONS}")
        _check(self.num_threads is None or self.num_threads >= 1, "num_threads",
               self.num_threads, "use 1 or more, or leave unset for all cores")
        _check(self.objective in OBJECTIVES, "objective", self.objective,
               f"use one of {OBJECTIVES}")
        _check(self.dpo_beta > 0, "dpo_beta", self.dpo_beta, "use a positive value, e.g. 0.1")
        _check(0 < self.dpo_learning_rate <= 1e-2, "dpo_learning_rate", self.dpo_learning_rate,
               "use a value in (0, 1e-2]")
        _check(self.dpo_epochs >= 1, "dpo_epochs", self.dpo_epochs, "use 1 or more")
        _check(self.dpo_batch_size >= 1, "dpo_batch_size", self.dpo_batch_size, "use 1 or more")

    @classmethod
    def from_file(cls, path: Path, **overrides: Any) -> RecipeConfig:
        """Load a ``.yaml``/``.yml``/``.toml`` file, then apply non-None ``overrides``.

        Raises :class:`ConfigError` for an unknown key, a bad value or a bad file.
        """
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist; see {CONFIGS_DIR} for examples")
        text = path.read_text()
        if path.suffix in {".yaml", ".yml"}:
            raw = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            raw = tomllib.loads(text)
        else:
            raise ConfigError(f"config file {path}: use a .yaml, .yml or .toml file")
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of field: value")
        return cls.from_dict({**raw, **{k: v for k, v in overrides.items() if v is not None}},
                             source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> RecipeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**raw)

    def replace(self, **overrides: Any) -> RecipeConfig:
        """A copy with the non-None ``overrides``, validated again."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    def fingerprint(self) -> str:
        """Stable hash of every hyperparameter, for idempotent reruns."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _check(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {fix}")


def task_recipe_fields(kind: str) -> dict[str, Any]:
    """The demo recipe's fields for a ``json`` or ``text`` alias (the task demos and the
    canary bench train with it): sequences that hold an object or a reply, and three
    passes, since one pass over a few hundred examples does not teach such a mapping.
    A ``text`` retrain that continues from production goes at the default recipe's LoRA
    rate: a reply continued at the demo's high rate (chosen for one pass over intent
    names) loses what production writes well."""
    fields_ = yaml.safe_load(DEMO_CONFIG.read_text())
    fields_ |= {"max_seq_len": 256, "epochs": 3}
    if kind == "text":
        fields_["continued_learning_rate"] = RecipeConfig.from_file(DEFAULT_CONFIG).learning_rate
    return dict(fields_)
