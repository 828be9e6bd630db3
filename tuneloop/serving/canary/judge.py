"""Asking the side-by-side judge (``canary.judge``) with the official ``openai`` client.

Each pair is asked twice, the candidate's answer first and then second, with at most
``canary.judge.concurrency`` requests in flight; the verdicts go to
:mod:`tuneloop.services.canary.judge`, which decides.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

import openai

from tuneloop.runtime.settings import JudgeSettings
from tuneloop.services.canary.judge import Judged, judge_messages, pair_outcome, parse_verdict
from tuneloop.services.curation.core import Example

log = logging.getLogger(__name__)


class JudgeError(RuntimeError):
    """The judge endpoint failed after the client's retries."""


def judge_pairs(cfg: JudgeSettings, examples: Sequence[Example], incumbent: Sequence[str],
                candidate: Sequence[str]) -> Judged:
    """The judge's verdicts on the last ``cfg.max_pairs`` examples' answer pairs (the
    newest: a later look of the gate judges the events that arrived since).

    Raises :class:`JudgeError` naming the endpoint when a request fails.
    """
    start = max(0, len(examples) - cfg.max_pairs)
    return asyncio.run(_judge_all(cfg, examples[start:], incumbent[start:], candidate[start:]))


async def _judge_all(cfg: JudgeSettings, examples: Sequence[Example],
                     incumbent: Sequence[str], candidate: Sequence[str]) -> Judged:
    key = cfg.api_key.get_secret_value() if cfg.api_key is not None else "none"
    client = openai.AsyncOpenAI(base_url=cfg.url, api_key=key, max_retries=2,
                                timeout=cfg.timeout_s)
    gate = asyncio.Semaphore(cfg.concurrency)

    async def verdict(messages: Sequence[Mapping[str, str]]) -> str | None:
        async with gate:
            reply = await client.chat.completions.create(
                model=cfg.model, messages=list(messages),  # type: ignore[arg-type]
                max_tokens=8, temperature=0)
            return parse_verdict(reply.choices[0].message.content or "")

    async def one(i: int) -> dict[str, object]:
        ex, inc, cand = examples[i], incumbent[i], candidate[i]
        chat = ex.messages[:-1]
        first, second = await asyncio.gather(
            verdict(judge_messages(chat, ex.completion, cand, inc)),
            verdict(judge_messages(chat, ex.completion, inc, cand)))
        return {"index": i, "candidate_first": first, "candidate_second": second,
                "outcome": pair_outcome(first, second)}

    try:
        verdicts = await asyncio.gather(*(one(i) for i in range(len(examples))))
    except openai.APIStatusError as exc:
        raise JudgeError(f"judge {cfg.model} at {cfg.url}: {exc.status_code} "
                         f"{exc.message}") from None
    except openai.APIConnectionError as exc:
        raise JudgeError(f"judge {cfg.model} at {cfg.url}: {exc}") from None
    finally:
        await client.close()
    log.info("judge %s: %d pairs judged in both orders", cfg.model, len(verdicts))
    return Judged(cfg.model, list(verdicts))
