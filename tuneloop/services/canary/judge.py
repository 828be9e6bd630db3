"""The side-by-side judge of free-text answers: prompts, verdicts and the sign test. Pure.

When ``canary.judge`` names a model, the offline gate asks it which of two answers to the
same request is better, for every test pair, twice: once with the candidate's answer
first and once with it second. A pair counts as a win for the candidate only when both
verdicts agree on it, as a loss only when both agree on the incumbent; anything else
(a tie, a verdict that follows the position, an unreadable reply) is a tie. Wins against
losses are tested with a sign test (exact binomial, ties left out), as in MT-Bench and
Chatbot Arena's pairwise protocol.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuneloop.runtime.settings import CanarySettings
from tuneloop.services.canary.core import FAIL, HOLD, PASS, Check
from tuneloop.services.canary.stats import sign_test

SYSTEM = ("You are a careful judge of assistant replies. You compare two replies to the same "
          "conversation and say which one serves the user better: correct, helpful, on topic, "
          "and in the form the conversation asks for.")
TEMPLATE = """The conversation so far:
{conversation}

A reply a person wrote for it (a good reply need not use the same words):
{reference}

Reply A:
{a}

Reply B:
{b}

Which reply is better? Answer with exactly one word: A, B, or tie."""
# The capital letters A and B (an "a" is an article), or the word tie in any case.
_VERDICT = re.compile(r"\b(A|B|[Tt][Ii][Ee])\b")
WIN, LOSS, TIE = "win", "loss", "tie"


def judge_messages(conversation: Sequence[Mapping[str, str]], reference: str, a: str,
                   b: str) -> list[dict[str, str]]:
    """The chat that asks the judge to compare reply ``a`` with reply ``b``."""
    turns = "\n".join(f"{m['role']}: {m['content']}" for m in conversation
                      if m.get("role") != "system")
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": TEMPLATE.format(conversation=turns, reference=reference,
                                                         a=a, b=b)}]


def parse_verdict(reply: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from the judge's reply: the reply itself when it is one
    letter, else its first capital A or B or word tie; None when it names none."""
    bare = (reply or "").strip().strip(".!*'\"` ").lower()
    if bare in ("a", "b"):
        return bare.upper()
    found = _VERDICT.search(reply or "")
    if found is None:
        return None
    word = found.group(1)
    return "tie" if word.lower() == "tie" else word.upper()


def pair_outcome(candidate_first: str | None, candidate_second: str | None) -> str:
    """The candidate's result on one pair, from the verdict with its answer as A and the
    verdict with its answer as B: a win or a loss only when both agree."""
    if candidate_first == "A" and candidate_second == "B":
        return WIN
    if candidate_first == "B" and candidate_second == "A":
        return LOSS
    return TIE


@dataclass(frozen=True)
class Judged:
    """The judge's verdicts on a gate's pairs, kept with the decision."""

    model: str
    verdicts: list[dict[str, Any]]  # per pair: index, candidate_first, candidate_second, outcome

    @property
    def outcomes(self) -> Counter[str]:
        return Counter(v["outcome"] for v in self.verdicts)

    def figures(self) -> dict[str, Any]:
        counts = self.outcomes
        return {"model": self.model, "system": SYSTEM, "template": TEMPLATE,
                "wins": counts[WIN], "losses": counts[LOSS], "ties": counts[TIE],
                "verdicts": self.verdicts}


def judge_check(judged: Judged, cfg: CanarySettings, look: int = 1) -> Check:
    """The improvement by the judge: a sign test of wins against losses, one-sided each way.

    Passes at ``alpha / offline_looks`` (as the other improvement tests), fails when the
    candidate loses significantly at ``alpha``, holds otherwise.
    """
    counts = judged.outcomes
    wins, losses, ties = counts[WIN], counts[LOSS], counts[TIE]
    test = sign_test(wins, losses)
    alpha = cfg.alpha / cfg.offline_looks
    name = f"test split improvement (judge {judged.model}, sign test)"
    detail = (f"{wins} wins, {losses} losses, {ties} ties over {len(judged.verdicts)} pairs, "
              f"each judged in both orders; look {look}/{cfg.offline_looks}")
    threshold = f"pass if p < {alpha:.3g} (alpha / {cfg.offline_looks} looks)"
    if test.p_better < alpha:
        return Check(name, PASS, float(wins - losses), test.p_better, threshold, detail)
    if test.p_worse < cfg.alpha:
        return Check(name, FAIL, float(wins - losses), test.p_worse,
                     f"fail if worse with p < {cfg.alpha}", detail + ": significantly worse")
    return Check(name, HOLD, float(wins - losses), test.p_better, threshold,
                 detail + ": inconclusive")


def decide_with_judge(checks: list[Check], judged: Judged, cfg: CanarySettings,
                      look: int = 1) -> list[Check]:
    """``checks`` of the improvement with the judge deciding: the reference-score
    improvement test is kept as information, the judge's sign test takes its place."""
    kept = [Check(c.name, "info", c.statistic, c.p_value, "reported; the judge decides",
                  c.detail) if c.name.startswith("test split improvement") else c
            for c in checks]
    return [judge_check(judged, cfg, look), *kept]
