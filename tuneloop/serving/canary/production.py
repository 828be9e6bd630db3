"""The nightly production check: production on the golden set, a freeze when it fell."""

from __future__ import annotations

import logging

from tuneloop.runtime.settings import CanarySettings, Settings
from tuneloop.services.canary import store as canary_store
from tuneloop.services.canary.core import FAIL, PASS, Check, Decision, combine
from tuneloop.services.curation import golden
from tuneloop.services.drift.embeddings import answer_embed
from tuneloop.services.evaluation.tasks import evaluate
from tuneloop.services.registry import store as registry
from tuneloop.services.store.database import Store
from tuneloop.serving.canary.answers import answers

log = logging.getLogger(__name__)


def check_production(settings: Settings) -> Decision:
    """Score the alias's production (through the gateway) on the golden set against its
    score at promotion; a verdict of ``frozen`` freezes promotions unless a freeze is
    already active.

    Raises :class:`tuneloop.serving.control.GatewayError` when the gateway fails.
    """
    store = Store.of(settings)
    with store.connect() as con:
        adapter = registry.production(con, settings.serving.alias)
        version = adapter.version if adapter is not None else None
        gold = golden.load(con)
        baseline = canary_store.promoted_score(con, version) if version else None
    task = settings.task
    gold, left_out = golden.judgeable(gold, task)
    if left_out:
        log.warning("nightly check of %s: %s", version or "base",
                    golden.unjudgeable_note(left_out, len(gold) + left_out))
    if not gold:
        note = ("the golden set is empty: nothing to check" if not left_out else
                f"no golden reference the {task.kind} task can judge: nothing to check "
                f"({golden.unjudgeable_note(left_out, left_out)})")
        return Decision("freeze", None, version, "ok", figures={
            "golden_n": 0, "golden_left_out": left_out, "note": note})
    got = answers(settings, version, gold)
    report = evaluate(task.kind, got, [ex.completion for ex in gold],
                      [ex.label for ex in gold] if all(ex.label for ex in gold) else None,
                      schema=task.schema_document,
                      embed=answer_embed(task.kind, settings.embeddings))
    score = float(report.score if report.score is not None else report.exact_match)
    checks = score_checks(score, baseline, settings.canary)
    figures = {"golden_n": report.n, "golden_left_out": left_out, "kind": task.kind,
               "score": score,
               "accuracy": report.accuracy, "macro_f1": report.macro_f1,
               "task_figures": report.figures, "baseline": baseline}
    decision = Decision("freeze", None, version, combine(checks, "ok", "frozen"), checks, figures)
    if decision.verdict == "frozen":
        with store.connect() as con:
            if canary_store.active_freeze(con) is None:
                canary_store.freeze(con, decision.reason, decision.figures)
                log.warning("promotions frozen: %s", decision.reason)
    return decision


def score_checks(score: float, baseline: float | None, cfg: CanarySettings) -> list[Check]:
    """Production's golden score against its score at promotion less
    ``canary.freeze_max_drop``, and against ``canary.freeze_min_score`` when set."""
    checks = []
    if baseline is not None:
        floor = baseline - cfg.freeze_max_drop
        checks.append(Check("golden score vs promotion", FAIL if score < floor else PASS, score,
                            None, f">= {floor:.3f} ({baseline:.3f} at promotion - "
                            f"{cfg.freeze_max_drop})", f"now {score:.3f}"))
    if cfg.freeze_min_score is not None:
        checks.append(Check("golden score minimum", FAIL if score < cfg.freeze_min_score else PASS,
                            score, None, f">= {cfg.freeze_min_score}", f"now {score:.3f}"))
    return checks
