"""What a run leaves beside its adapter: the loss history and the training-curve plot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
