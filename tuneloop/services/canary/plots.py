"""The canary's comparison, for people."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_canary(per_label: Mapping[str, Mapping[str, float]] | None,
                latencies: Mapping[str, Sequence[float]] | None, title: str, path: Path) -> Path:
    """The canary comparison: golden per-label F1 of both versions, live latency distributions.

    Either part may be missing (a candidate rejected offline never had a live window).
    Raises ``ValueError`` when both are.
    """
    parts = [p for p in (per_label, latencies) if p]
    if not parts:
        raise ValueError("nothing to plot: no per-label scores and no live latencies")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts) + 1, 4), dpi=110,
                             squeeze=False)
    col = 0
    if per_label:
        ax = axes[0][col]
        col += 1
        labels = sorted(per_label)
        x = range(len(labels))
        width = 0.4
        ax.bar([i - width / 2 for i in x], [per_label[k]["incumbent_f1"] for k in labels], width,
               label="production", color="#999999")
        ax.bar([i + width / 2 for i in x], [per_label[k]["candidate_f1"] for k in labels], width,
               label="candidate", color="#4477aa")
        ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("golden F1")
        ax.set_title("Golden set, per label")
        ax.legend(fontsize=8)
    if latencies:
        ax = axes[0][col]
        colors = {"production": "#999999", "candidate": "#4477aa"}
        for name, values in latencies.items():
            if values:
                ax.hist([1000 * v for v in values], bins=30, alpha=0.6, label=name,
                        color=colors.get(name))
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("requests")
        ax.set_title("Live window latency")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
