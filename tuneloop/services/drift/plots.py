"""Drift score over time, for people."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from tuneloop.services.drift.store import ReportRow


def _threshold(rows: Sequence[ReportRow]) -> float | None:
    """The practical threshold of the latest report that recorded one."""
    for row in reversed(rows):
        if row.min_novel_share is not None:
            return row.min_novel_share
    return None


def plot_drift_history(rows: Sequence[ReportRow], path: Path,
                       marks: Mapping[str, datetime] | None = None) -> Path:
    """Write a PNG of drift score per report, drifted reports in red; ``marks`` are
    labelled vertical lines (when the traffic shifted, when a version was promoted).

    Raises ``ValueError`` when there is no report to plot.
    """
    if not rows:
        raise ValueError("no drift reports yet: run `tuneloop drift` first")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    times = [float(mdates.date2num(r.created_at)) for r in rows]
    scores = [r.score for r in rows]
    fig, ax = plt.subplots(figsize=(9, 3.5), dpi=110)
    ax.plot(times, scores, color="#4477aa", linewidth=1.2, marker="o", markersize=3, zorder=1)
    drifted = [(t, s) for t, s, r in zip(times, scores, rows, strict=True) if r.drifted]
    if drifted:
        ax.scatter(
            [t for t, _ in drifted], [s for _, s in drifted], color="#cc3311", s=28, zorder=2,
            label="drift",
        )
        ax.legend(loc="upper left")
    for i, (label, when) in enumerate((marks or {}).items()):
        ax.axvline(float(mdates.date2num(when)), color=("#ee7733", "#228833", "#aa3377")[i % 3],
                   linestyle="--", linewidth=1.2, label=label)
    if marks:
        ax.legend(loc="upper left")
    ax.set_ylim(0, max(1.0, max(scores) * 1.05))
    threshold = _threshold(rows)
    if threshold is not None:
        ax.axhline(threshold, color="#999999", linestyle=":", linewidth=1,
                   label=f"acts at {threshold:.2f}")
        ax.legend(loc="upper left")
    ax.set_ylabel("novel share of traffic")
    ax.set_title(f"tuneloop drift: {len(rows)} reports, {len(drifted)} with drift")
    ax.grid(alpha=0.3)
    ax.xaxis_date()
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
