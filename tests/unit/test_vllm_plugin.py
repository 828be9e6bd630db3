"""The grouped LoRA ops of tuneloop's vLLM plugin against vLLM's per-token reference semantics."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vllm-plugin"))

from tuneloop_vllm import lora_ops  # noqa: E402


def reference(inputs: torch.Tensor, stacked: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """vLLM's torch op: one gathered matrix per token, einsum; -1 rows get nothing."""
    weights = stacked.squeeze(1) if stacked.dim() == 4 else stacked
    gathered = weights[indices.clamp(min=0)]
    out = torch.einsum("bi, boi -> bo", inputs, gathered)
    out[indices < 0] = 0
    return out


@pytest.mark.parametrize("indices", [[0, 0, 0, 0, 0], [1, 0, 1, 1, 0], [-1, 1, -1, 0, 1],
                                     [-1, -1, -1, -1, -1]])
def test_shrink_and_expand_match_the_per_token_reference(indices: list[int]) -> None:
    torch.manual_seed(0)
    idx = torch.tensor(indices)
    x = torch.randn(5, 32)
    a = torch.randn(2, 1, 8, 32)  # (max_loras, 1, rank, hidden)
    b = torch.randn(2, 1, 48, 8)  # (max_loras, 1, out, rank)

    shrunk = torch.zeros(5, 8)
    lora_ops.bgmv_shrink(x, a, shrunk, idx, scaling=0.5)
    torch.testing.assert_close(shrunk, 0.5 * reference(x, a, idx))

    y = torch.randn(5, 48)
    expected = y + reference(shrunk, b, idx)
    lora_ops.bgmv_expand(shrunk, b, y, idx, add_inputs=True)
    torch.testing.assert_close(y, expected)

    wide = torch.zeros(5, 100)
    lora_ops.bgmv_expand_slice(shrunk, b, wide, idx, 10, 48, add_inputs=False)
    torch.testing.assert_close(wide[:, 10:58], reference(shrunk, b, idx))
    assert wide[:, :10].abs().sum() == 0 and wide[:, 58:].abs().sum() == 0


def test_prefill_ops_expand_one_index_per_sequence() -> None:
    torch.manual_seed(1)
    x = torch.randn(7, 16)
    a = torch.randn(3, 1, 4, 16)
    seq_lens = torch.tensor([3, 4])
    per_seq = torch.tensor([2, 0])
    out = torch.zeros(7, 4)
    lora_ops.sgmv_shrink(x, a, out, torch.tensor([0, 3]), seq_lens, per_seq, 2, 4, 7, 1.0)
    torch.testing.assert_close(out, reference(x, a, torch.tensor([2, 2, 2, 0, 0, 0, 0])))
