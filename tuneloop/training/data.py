"""From chat examples to training tensors: assistant-only labels and packing.

Pure functions over token ids, so every rule here is unit-tested without a model:

- :func:`encode_example` keeps the loss on the assistant's answer only: the system
  and user turns (and the template's header of the assistant turn) are context;
  :func:`encode_chat` gets those token ids from the base tokenizer's chat template.
- :func:`pack_rows` puts several examples into one row of ``capacity`` tokens
  (first-fit decreasing), and :func:`collate` restarts ``position_ids`` at every
  example. With no attention mask, transformers reads the restarts as packed
  sequences and attends within each example only, so packing changes neither the
  loss nor the gradients, it only removes padding.
- ``Batch.targets`` holds, per position, the token that position must predict
  (``-100`` where none). The recipe projects only those positions through the
  49k-wide LM head instead of all of them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """One tokenised example: ids and labels of equal length (``IGNORE`` = context)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Batch:
    """Tensors of one micro-batch, shape ``[rows, length]``."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor | None
    n_tokens: int  # real (non-padding) tokens
    n_targets: int  # tokens the loss is computed on

    def to(self, device: torch.device) -> Batch:
        mask = self.attention_mask.to(device) if self.attention_mask is not None else None
        return Batch(self.input_ids.to(device), self.position_ids.to(device),
                     self.targets.to(device), mask, self.n_tokens, self.n_targets)


def encode_example(prompt_ids: Sequence[int], full_ids: Sequence[int]) -> Encoded:
    """Label the tokens of ``full_ids`` that come after the ``prompt_ids`` prefix.

    ``prompt_ids`` is the chat up to and including the assistant header
    (``add_generation_prompt=True``); ``full_ids`` the whole chat with the answer.
    Raises ``ValueError`` if the prompt is not a prefix (a template that rewrites
    earlier turns) or if nothing is left to learn.
    """
    n = len(prompt_ids)
    if list(full_ids[:n]) != list(prompt_ids):
        raise ValueError(
            "the chat template renders the prompt differently with and without the answer; "
            "use a tokenizer whose template appends turns"
        )
    if len(full_ids) <= n:
        raise ValueError("the example has no assistant tokens to learn from")
    return Encoded(tuple(full_ids), (IGNORE,) * n + tuple(full_ids[n:]))


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> Encoded:
    """Tokenise a chat with the base tokenizer's template; labels on the answer only.

    The answer's labels run through the end-of-turn token, so the model learns to stop.
    """
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and eos in full_ids[len(prompt_ids):]:
        full_ids = full_ids[: full_ids.index(eos, len(prompt_ids)) + 1]
    return encode_example(prompt_ids, full_ids)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into rows of at most ``capacity`` tokens (first-fit decreasing).

    Raises ``ValueError`` if one example alone is longer than ``capacity``.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[index]
        if size > capacity:
            raise ValueError(f"example {index} has {size} tokens, more than capacity={capacity}")
        for row, room in enumerate(free):
            if size <= room:
                rows[row].append(index)
                free[row] -= size
                break
        else:
            rows.append([index])
            free.append(capacity - size)
    return rows


def collate(examples: Sequence[Encoded], pad_id: int, packing: bool, capacity: int) -> Batch:
    """Tensors for ``examples``: packed rows, or one padded row per example.

    Packed rows are padded to the longest row; the padding is a segment of its own
    (positions restart), so no real token attends to it and it carries no target.
    """
    groups = pack_rows([len(e) for e in examples], capacity) if packing else [
        [i] for i in range(len(examples))
    ]
    width = max(sum(len(examples[i]) for i in group) for group in groups)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(groups), width), dtype=torch.long)
    targets = torch.full((len(groups), width), IGNORE, dtype=torch.long)
    mask = None if packing else torch.zeros((len(groups), width), dtype=torch.long)
    for row, group in enumerate(groups):
        start = 0
        for index in group:
            example = examples[index]
            end = start + len(example)
            ids[row, start:end] = torch.tensor(example.input_ids)
            pos[row, start:end] = torch.arange(len(example))
            # Position t predicts token t+1 of the same example.
            targets[row, start:end - 1] = torch.tensor(example.labels[1:])
            start = end
        if mask is not None:
            mask[row, :start] = 1
        if start < width:
            pos[row, start:] = torch.arange(width - start)
    n_tokens = sum(len(e) for e in examples)
    return Batch(ids, pos, targets, mask, n_tokens, int((targets != IGNORE).sum()))


def micro_batches(
    examples: Sequence[Encoded], batch_size: int, seed: int, epoch: int
) -> Iterator[list[Encoded]]:
    """Shuffled micro-batches of one epoch; the order depends only on (seed, epoch)."""
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        yield [examples[i] for i in order[start:start + batch_size]]
    tail = len(order) % batch_size
    if tail and len(order) < batch_size:
        # Fewer examples than one batch: still train on them.
        yield [examples[i] for i in order]


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum_steps: int) -> int:
    micro = max(1, n_examples // batch_size)
    return max(1, micro // grad_accum_steps)


def learning_rate_at(
    step: int, total_steps: int, peak: float, warmup_ratio: float, min_lr_ratio: float
) -> float:
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to the floor.

    ``step`` counts from 0 (the rate used for the first optimizer step).
    """
    warmup = math.ceil(warmup_ratio * total_steps) if warmup_ratio > 0 else 0
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    floor = peak * min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
