"""Resumable checkpoints in safetensors only: LoRA weights, AdamW moments, loop state
(:class:`LoopState`, with its :class:`EarlyStopping`).

Nothing here unpickles: tensors go to ``.safetensors`` files and the rest (step,
best loss, history, optimizer hyperparameters) to JSON. A checkpoint is written to
a temporary directory and renamed over the previous one, so a crash mid-save
leaves the last complete checkpoint in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tuneloop.training.report import Point

STATE = "state.json"


@dataclass
class EarlyStopping:
    """Patience on validation loss: stop after ``patience`` evaluations without a gain.

    A gain is a loss below the best so far by more than ``min_delta``.
    """

    patience: int
    min_delta: float
    best: float
    best_step: int = 0
    bad: int = 0

    def update(self, step: int, loss: float) -> bool:
        """Record an evaluation; True if it is the new best."""
        if loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad = loss, step, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad >= self.patience


@dataclass
class LoopState:
    """The training loop's state, saved with every checkpoint."""

    step: int
    train_tokens: int
    train_s: float
    train_curve: list[Point]
    val_curve: list[Point]
    stopper: EarlyStopping
    best_weights: dict[str, torch.Tensor]

    def to_state(self) -> dict[str, Any]:
        """What the checkpoint's JSON keeps (the tensors go beside it)."""
        return {
            "step": self.step, "train_tokens": self.train_tokens, "train_s": self.train_s,
            "train_curve": [[p.step, p.loss] for p in self.train_curve],
            "val_curve": [[p.step, p.loss] for p in self.val_curve],
            "best": self.stopper.best, "best_step": self.stopper.best_step,
            "bad": self.stopper.bad,
        }


def save_checkpoint(
    directory: Path,
    adapter: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:
    """Replace the checkpoint at ``directory`` atomically."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=directory.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()},
                  str(tmp / "adapter.safetensors"))
        moments, groups = _flatten_optimizer(optimizer)
        save_file(moments, str(tmp / "optimizer.safetensors"))
        (tmp / STATE).write_text(json.dumps({**state, "param_groups": groups}))
        for file in tmp.iterdir():
            with file.open("rb") as fh:
                os.fsync(fh.fileno())
        replace_checkpoint(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_checkpoint(new: Path, directory: Path) -> None:
    """Put the whole checkpoint ``new`` at ``directory`` by two renames: a crash between
    them leaves the previous one at ``<directory>.old``, where :func:`load_checkpoint`
    finds it."""
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        # A whole checkpoint at ``directory``: the ``.old`` one is stale. Without one,
        # ``.old`` is the last whole checkpoint (a crash between the renames) and stays
        # until ``new`` is in place.
        shutil.rmtree(old, ignore_errors=True)
        os.rename(directory, old)
    os.rename(new, directory)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    directory: Path, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The adapter weights and loop state saved at ``directory``, restoring ``optimizer``.

    Returns None when there is no complete checkpoint.
    """
    if not (directory / STATE).exists():
        old = directory.with_name(directory.name + ".old")
        if not (old / STATE).exists():
            return None
        directory = old  # a crash between the two renames of save_checkpoint
    state = json.loads((directory / STATE).read_text())
    _restore_optimizer(optimizer, load_file(str(directory / "optimizer.safetensors")),
                       state.pop("param_groups"))
    return load_file(str(directory / "adapter.safetensors")), state


def _flatten_optimizer(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, slots in sd["state"].items():
        for name, value in slots.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{index}.{name}"] = tensor.detach().contiguous().cpu()
    groups = [{k: v for k, v in group.items()} for group in sd["param_groups"]]
    return tensors, groups


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": groups})
