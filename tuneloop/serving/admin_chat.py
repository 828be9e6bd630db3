"""Greedy answers of one exact version, through the gateway's internal chat route.

The public route serves an alias (production, or the canary for its share of users);
the canary's evaluations must ask one exact version instead, so they use the
gateway's admin route ``/admin/v1`` with the official ``openai`` client, many requests
in flight at once so vLLM batches them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import openai

from tuneloop.runtime.settings import Settings
from tuneloop.services.registry.core import vllm_name
from tuneloop.serving import control


def model_name(settings: Settings, version: str | None) -> str:
    """The name the internal route knows: ``support-bot-v7``, or the base model's.

    Raises :class:`tuneloop.serving.control.GatewayError` when the base model's name is
    asked of a gateway that is down.
    """
    if version is not None:
        return vllm_name(settings.serving.alias, version)
    return str(control.GatewayAdmin(settings).state()["base_model"])


def ask(settings: Settings, model: str,
        prompts: Mapping[str, Sequence[Mapping[str, str]]]) -> dict[str, str]:
    """``model``'s greedy answer to each prompt (key -> chat messages), by key.

    At most ``canary.eval_concurrency`` requests are in flight, each up to the task's
    answer budget (``tasks.<alias>.answer_tokens``). Raises :class:`tuneloop.serving.control.GatewayError`
    with the gateway's status (0: unreachable) when a request fails after the client's
    retries.
    """
    return asyncio.run(_ask_all(settings, model, prompts))


async def _ask_all(settings: Settings, model: str,
                   prompts: Mapping[str, Sequence[Mapping[str, str]]]) -> dict[str, str]:
    cfg = settings.canary
    client = openai.AsyncOpenAI(base_url=f"{settings.serving.gateway_url}/admin/v1",
                                api_key=control.admin_key(settings), max_retries=2,
                                timeout=settings.serving.upstream_timeout_s)
    gate = asyncio.Semaphore(cfg.eval_concurrency)
    budget = settings.task.max_answer_tokens

    async def one(key: str, messages: Sequence[Mapping[str, str]]) -> tuple[str, str]:
        async with gate:
            reply = await client.chat.completions.create(
                model=model, messages=list(messages),  # type: ignore[arg-type]
                max_tokens=budget, temperature=0)
            return key, (reply.choices[0].message.content or "").strip()

    try:
        pairs = await asyncio.gather(*(one(k, m) for k, m in prompts.items()))
    except openai.APIStatusError as exc:
        raise control.GatewayError(exc.status_code, f"evaluating {model}: {exc.message}") from None
    except openai.APIConnectionError as exc:
        raise control.GatewayError(0, f"evaluating {model}: {exc}") from None
    finally:
        await client.close()
    return dict(pairs)
