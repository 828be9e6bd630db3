"""Recording a decision: the one entry point for every verdict of the canary.

The canary flow's gates, the nightly production check and the CLI's manual rollback all
record through :func:`record`, so each decision lands the same way: a row in
``canary_decisions``, one more ``stage:verdict`` in the loop's counters (the figures
Prometheus and ``tuneloop status`` read under ``<home>/run/``), the live window's length
when it has one, and the comparison plot when there is something to compare.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tuneloop.services.canary import store as canary_store
from tuneloop.services.canary.core import Decision
from tuneloop.services.canary.live import Side
from tuneloop.services.canary.plots import plot_canary
from tuneloop.services.loop import metrics as loop_metrics
from tuneloop.services.store.database import AnyStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recorded:
    """A stored decision: its id, and its comparison plot if one was drawn."""

    decision_id: str
    image: Path | None


def record(store: AnyStore, home: Path, decision: Decision, run_id: str | None = None,
           sides: tuple[Side, Side] | None = None) -> Recorded:
    """Store ``decision`` (made by flow run ``run_id``, None: by hand), count it in the
    loop's metrics, and draw the golden per-label F1 of its offline gate and the live
    latencies of ``sides`` (candidate, production) when there are any.

    Raises ``StoreBusyError`` when the store stays held by another process.
    """
    with store.connect() as con:
        decision_id = canary_store.record_decision(con, decision, run_id)
        offline = decision.figures if decision.stage == "offline" else \
            canary_store.latest_figures(con, decision.candidate, "offline")
    loop_metrics.count_decision(home, decision.stage, decision.verdict)
    if "live_s" in decision.figures:
        loop_metrics.record(home, "canary", seconds=decision.figures["live_s"],
                            verdict=decision.verdict, candidate=decision.candidate)
    per_label = offline.get("golden_per_label")
    latencies = None if sides is None else {"candidate": sides[0].latencies_s,
                                            "production": sides[1].latencies_s}
    image = None
    if per_label or latencies:
        image = plot_canary(per_label, latencies, decision.reason[:120],
                            Path(home) / "reports" / f"canary-{decision_id}.png")
    log.info("canary decision %s: %s", decision_id, decision.reason)
    return Recorded(decision_id, image)


def describe(decision: Decision) -> str:
    """A decision as Markdown: who, the verdict, every check with its statistic and p-value."""
    lines = [f"## {decision.stage} gate: **{decision.verdict}**", "",
             f"candidate **{decision.candidate or 'base'}** vs incumbent "
             f"**{decision.incumbent or 'base model'}**", "",
             "| check | outcome | statistic | p-value | threshold | detail |",
             "|---|---|---|---|---|---|"]
    for c in decision.checks:
        stat = "-" if c.statistic is None else f"{c.statistic:.4g}"
        p = "-" if c.p_value is None else f"{c.p_value:.3g}"
        lines.append(f"| {c.name} | {c.outcome} | {stat} | {p} | {c.threshold} | {c.detail} |")
    return "\n".join(lines)
