"""A curation report, for people."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def plot_curation(report: Mapping[str, object], title: str, path: Path) -> Path:
    """Where the feedback went: kept and replayed examples, and each reason for a drop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dropped = dict(report.get("dropped") or {})  # type: ignore[call-overload]
    rows = [("kept", int(report.get("kept") or 0), "#228833"),  # type: ignore[call-overload]
            ("replayed", int(report.get("replayed") or 0), "#4477aa")]  # type: ignore[call-overload]
    rows += [(f"dropped: {why}", int(n), "#cc3311") for why, n in dropped.items() if n]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2), dpi=110)
    bars = ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1],
                   color=[r[2] for r in rows][::-1])
    ax.bar_label(bars, fontsize=7)
    ax.set_title(title)
    ax.set_xlabel("examples")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
