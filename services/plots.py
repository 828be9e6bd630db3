"""Charts for people: drift score over time, the canary's comparison, the demo's report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from services.drift_store import ReportRow


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
