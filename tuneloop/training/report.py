"""What a run leaves beside its adapter: its figures, the loss history and the training-curve plot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@dataclass(frozen=True)
class Point:
    step: int
    loss: float


@dataclass
class TrainResult:
    """What one run achieved; ``best_val_loss`` belongs to the weights kept."""

    steps: int
    total_steps: int
    stopped_early: bool
    initial_val_loss: float
    best_val_loss: float
    best_step: int
    train_tokens: int
    train_s: float
    tokens_per_s: float
    train_curve: list[Point] = field(default_factory=list)
    val_curve: list[Point] = field(default_factory=list)
    curve_path: Path | None = None
    resumed_from_step: int = 0  # the checkpoint a restarted run went on from; 0 when fresh

    def metrics(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "total_steps": self.total_steps,
            "resumed_from_step": self.resumed_from_step,
            "stopped_early": self.stopped_early, "initial_val_loss": self.initial_val_loss,
            "best_val_loss": self.best_val_loss, "best_step": self.best_step,
            "train_tokens": self.train_tokens, "tokens_per_s": self.tokens_per_s,
        }


def progress_bar(disable: bool = False) -> Progress:
    """A rich bar showing step, training loss, validation loss and tokens/s."""
    return Progress(
        TextColumn("[bold]train[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("val {task.fields[val]}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=disable,
    )


def plot_curve(train: Sequence[Point], validation: Sequence[Point], path: Path,
               title: str) -> Path:
    """Save training and validation loss against optimizer step as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([p.step for p in train], [p.loss for p in train], label="train", alpha=0.6)
    if validation:
        ax.plot([p.step for p in validation], [p.loss for p in validation], "o-",
                label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
