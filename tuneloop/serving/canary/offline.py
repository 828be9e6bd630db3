"""The offline gate: the candidate against the incumbent on examples, before any user sees it.

The golden set is evaluated first (a regression rejects without spending time on the
rest), then the candidate's test split with the labelled events written after its
dataset. Both versions answer through the gateway's internal route.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tuneloop.runtime.settings import Settings
from tuneloop.services.canary.core import (
    Decision,
    Paired,
    Plan,
    another_look,
    combine,
    golden_checks,
    improvement_checks,
    known_label_checks,
)
from tuneloop.services.canary.judge import decide_with_judge
from tuneloop.services.curation import golden
from tuneloop.services.curation.core import Example
from tuneloop.services.curation.datasets import load_examples
from tuneloop.services.curation.store import fresh_examples
from tuneloop.services.drift.embeddings import answer_embed
from tuneloop.services.evaluation.tasks import evaluate
from tuneloop.services.registry.store import get_adapter
from tuneloop.services.store.database import Store
from tuneloop.serving import control
from tuneloop.serving.canary.answers import paired
from tuneloop.serving.canary.judge import judge_pairs
from tuneloop.serving.canary.live import start

log = logging.getLogger(__name__)


def gate_examples(settings: Settings, candidate: str
                  ) -> tuple[list[Example], list[Example], list[Example]]:
    """The golden set, the candidate's test split, and the labelled events written after
    its dataset (:func:`tuneloop.services.curation.store.fresh_examples`)."""
    with Store.of(settings).connect() as con:
        adapter = get_adapter(con, candidate)
        gold = golden.load(con)
        if adapter.dataset_version is None:
            return gold, [], []
        test = [ex for ex in load_examples(con, adapter.dataset_version) if ex.split == "test"]
        fresh = fresh_examples(con, adapter.dataset_version, settings.curation,
                               settings.canary.fresh_max_examples, settings.task)
    return gold, test, fresh


def offline_gate(settings: Settings, plan: Plan, look: int = 1) -> Decision:
    """Load the candidate on the gateway, evaluate both versions, decide pass/reject/hold.

    ``look`` counts the looks at the same candidate (see ``canary.offline_looks``);
    answers are cached by weights, so a later look only asks the new events. A hold
    that another look may settle carries ``figures["next_look_at"]`` (epoch seconds).
    Raises :class:`tuneloop.serving.control.GatewayError` when the gateway fails, and
    :class:`tuneloop.serving.canary.judge.JudgeError` when the judge (``canary.judge``,
    text tasks) does.
    """
    cfg = settings.canary
    candidate, incumbent = plan.candidate, plan.incumbent
    admin = control.GatewayAdmin(settings)
    admin.load(candidate)
    if incumbent is not None:
        admin.load(incumbent)  # already routed: a no-op unless the gateway restarted
    gold, test, fresh = gate_examples(settings, candidate)
    started = time.perf_counter()
    golden_pairs = paired(settings, candidate, incumbent, gold)
    checks, figures = golden_checks(golden_pairs, cfg)
    if combine(checks) != "reject":
        examples = test + fresh
        pairs = paired(settings, candidate, incumbent, examples)
        more, test_figures = improvement_checks(pairs, cfg, len(fresh), look)
        known, known_figures = known_label_checks(golden_pairs, pairs, cfg)
        more += known
        test_figures.update(known_figures)
        if (task_figures := both_task_figures(settings, pairs)) is not None:
            test_figures["test_task_figures"] = task_figures
        if cfg.judge is not None and settings.task.kind == "text" and examples:
            judged = judge_pairs(cfg.judge, examples, pairs.incumbent, pairs.candidate)
            more = decide_with_judge(more, judged, cfg, look)
            test_figures["judge"] = judged.figures()
        checks += more
        figures.update(test_figures)
    figures["evaluation_s"] = round(time.perf_counter() - started, 2)
    decision = Decision("offline", candidate, incumbent, combine(checks), checks, figures)
    if another_look(decision, cfg) is not None:
        decision.figures["next_look_at"] = time.time() + cfg.offline_recheck_s
    return decision


def both_task_figures(settings: Settings, pairs: Paired) -> dict[str, Any] | None:
    """Each version's figures on the task's evaluation
    (:func:`~tuneloop.services.evaluation.tasks.evaluate`) beside the score that decides:
    for ``json`` the parse and schema-valid rates, field micro-F1 and exact matches; for
    ``text`` chrF, ROUGE-L and the cosine similarity of answer and reference under the
    deployed embedding model. None for labels, for no
    examples, and for references the task cannot judge (the checks say why)."""
    kind = settings.task.kind
    if kind == "label" or not pairs.references:
        return None
    embed = answer_embed(kind, settings.embeddings)
    try:
        return {side: evaluate(kind, answers, pairs.references, schema=pairs.schema,
                               embed=embed).figures
                for side, answers in (("incumbent", pairs.incumbent),
                                      ("candidate", pairs.candidate))}
    except ValueError as exc:  # a json reference that is not an object
        log.warning("task figures left out of the offline decision: %s", exc)
        return None


def conclude_offline(settings: Settings, decision: Decision, run_id: str | None) -> float | None:
    """Carry out an offline verdict: a pass opens the live window (returns when it began),
    a reject rejects and unloads the candidate, which never served a user; anything else
    leaves it a candidate (returns None for both).

    Raises ``RegistryError`` or :class:`tuneloop.serving.control.GatewayError` when the
    move is refused or fails.
    """
    candidate = decision.candidate
    if candidate is None:
        raise ValueError("an offline decision names its candidate")
    if decision.verdict == "pass":
        return start(settings, candidate, decision.incumbent, run_id)
    if decision.verdict == "reject":
        control.reject(settings, candidate, decision.reason)
        try:
            control.GatewayAdmin(settings).unload(candidate)
        except control.GatewayError as exc:
            log.info("unloading %s: %s", candidate, exc)
    return None
