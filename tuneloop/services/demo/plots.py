"""The demo report's before/after chart."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def plot_before_after(groups: Mapping[str, Mapping[str, float]], title: str, path: Path) -> Path:
    """Grouped bars: ``groups`` maps a series ("old intents, before") to metric -> value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({m for values in groups.values() for m in values})
    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=110)
    width = 0.8 / max(len(groups), 1)
    colours = ("#bbbbbb", "#4477aa", "#dddddd", "#228833")
    for i, (series, values) in enumerate(groups.items()):
        xs = [j + i * width for j in range(len(metrics))]
        bars = ax.bar(xs, [values.get(m, 0.0) for m in metrics], width, label=series,
                      color=colours[i % len(colours)], edgecolor="#333333", linewidth=0.5)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.set_ylim(0, 1.1)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", ncols=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
