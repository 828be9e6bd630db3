"""Grouped LoRA matmuls for vLLM's CPU backend, with the signatures of vLLM's torch ops.

vLLM's PyTorch fallback (``vllm/lora/ops/torch_ops/lora_ops.py``) gathers one weight
matrix per token, ``weights[indices]`` of shape (tokens, out, in), then multiplies with
an einsum: a prefill of a few thousand tokens copies gigabytes of weights per layer.
A batch holds at most ``max_loras`` adapters, so here each adapter's rows are gathered
instead and multiplied once by its matrix: the same result, no per-token copy.

Index -1 means "no adapter" (a base-model request in a mixed batch): its rows get no
LoRA delta, as with vLLM's GPU kernels.
"""

from __future__ import annotations

import torch


def _weights(stacked: torch.Tensor) -> torch.Tensor:
    """(max_loras, 1, out, in) or (max_loras, out, in) -> (max_loras, out, in)."""
    return stacked.squeeze(1) if stacked.dim() == 4 else stacked


def _grouped(inputs: torch.Tensor, stacked: torch.Tensor, indices: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    """Row t of the result is ``inputs[t] @ stacked[indices[t]].T``; zero where the index is -1."""
    weights = _weights(stacked)
    inputs = inputs.to(dtype)
    if indices.numel() == 0:
        return inputs.new_zeros((inputs.shape[0], weights.shape[1]))
    first = int(indices[0])
    if first >= 0 and bool((indices == first).all()):  # the usual case: one adapter
        return inputs @ weights[first].to(dtype).T
    out = inputs.new_zeros((inputs.shape[0], weights.shape[1]))
    for idx in torch.unique(indices).tolist():
        if idx < 0:
            continue
        rows = (indices == idx).nonzero(as_tuple=True)[0]
        out[rows] = inputs[rows] @ weights[idx].to(dtype).T
    return out


def bgmv_shrink(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, scaling: float = 1.0) -> None:
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, add_inputs: bool = True) -> None:
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # The adapter and the model may pad the output dimension differently.
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor,
                      output_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                      slice_offset: int, slice_size: int, add_inputs: bool = True) -> None:
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


def _explode(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, batches: int, max_seq_length: int,
                token_nums: int, scaling: float) -> None:
    bgmv_shrink(inputs, lora_a_weights, output_tensor,
                _explode(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, batches: int, max_seq_length: int,
                token_nums: int, add_inputs: bool = False) -> None:
    bgmv_expand(inputs, lora_b_weights, output_tensor,
                _explode(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor,
                      output_tensor: torch.Tensor, b_seq_start_loc: torch.Tensor,
                      seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                      batches: int, max_seq_length: int, token_nums: int, slice_offset: int,
                      slice_size: int, add_inputs: bool = False) -> None:
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor,
                      _explode(lora_indices_tensor, seq_len_tensor), slice_offset, slice_size,
                      add_inputs)
