"""Task evaluation through generation: answers from the model, scored by the evaluation stage.

The canary scores vLLM's answers with the same
:func:`tuneloop.services.evaluation.tasks.evaluate`, for the same task kind and answer
budget, so an adapter's training-time and canary metrics are comparable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from tuneloop.runtime.settings import TaskSpec
from tuneloop.services.evaluation.metrics import EvalReport
from tuneloop.services.evaluation.tasks import Embed, evaluate
from tuneloop.training.dataset import ChatExample

log = logging.getLogger(__name__)


@torch.inference_mode()
def generate_answers(
    model: Any,
    tokenizer: Any,
    examples: Sequence[ChatExample],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers to each example's prompt (the chat without its assistant turn)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues at the right edge
    answers: list[str] = []
    try:
        # Similar lengths together: less padding per generate() call.
        order = sorted(range(len(examples)),
                       key=lambda i: len(examples[i].prompt_messages[-1]["content"]))
        by_index: dict[int, str] = {}
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            prompts = [
                tokenizer.apply_chat_template(examples[i].prompt_messages, tokenize=False,
                                              add_generation_prompt=True)
                for i in chunk
            ]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            # use_cache: training turns the cache off in the config; without it every
            # new token would recompute the whole prompt.
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for i, text in zip(chunk, tokenizer.batch_decode(new, skip_special_tokens=True),
                               strict=True):
                by_index[i] = text.strip()
        answers = [by_index[i] for i in range(len(examples))]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def evaluate_examples(
    model: Any,
    tokenizer: Any,
    examples: Sequence[ChatExample],
    *,
    task: TaskSpec | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    embed: Embed | None = None,
) -> tuple[EvalReport, list[str]]:
    """Generate for ``examples`` and score the answers as ``task`` asks (its kind and
    answer budget; a label task without one: ``max_new_tokens``; for ``text`` the cosine
    similarity under ``embed`` too); returns the report and the answers."""
    task = task or TaskSpec()
    # A label task without its own budget keeps the recipe config's
    # (generation_max_new_tokens); json and text tasks need their kind's longer default.
    budget = task.answer_tokens or (max_new_tokens if task.kind == "label"
                                    else task.max_answer_tokens)
    answers = generate_answers(model, tokenizer, examples, max_new_tokens=budget,
                               batch_size=batch_size)
    labels = [e.label for e in examples]
    report = evaluate(task.kind, answers, [e.completion for e in examples],
                      labels if all(label is not None for label in labels) else None,
                      schema=task.schema_document, embed=embed)
    return report, answers
