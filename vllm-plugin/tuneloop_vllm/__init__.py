"""tuneloop's vLLM plugin, installed into the vLLM environment by ``make serving-setup``.

vLLM loads every ``vllm.general_plugins`` entry point in each of its processes. This
one resolves object-stored adapter versions (``s3://...``) through the replica's own
verified cache (:mod:`tuneloop_vllm.adapter_cache`), and replaces the PyTorch LoRA
ops of vLLM's CPU backend with grouped ones (:mod:`tuneloop_vllm.lora_ops`); GPU
backends use their own kernels and are left alone. ``TUNELOOP_VLLM_GROUPED_LORA=0``
turns the grouped ops off.
"""

from __future__ import annotations

import logging
import os

# A child of vLLM's own logger, so the line shows in the replica's log.
log = logging.getLogger("vllm.tuneloop_vllm")

_PATCHED = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand",
            "sgmv_expand_slice")


def register() -> None:
    """Route runtime LoRA loads of object-stored adapters through the replica's own
    cache (:mod:`tuneloop_vllm.adapter_cache`), and patch vLLM's CPU punica wrapper.
    Idempotent: vLLM may call this more than once."""
    from tuneloop_vllm import adapter_cache

    try:
        adapter_cache.install()
    except ImportError as exc:  # a vLLM without runtime LoRA loading: nothing to route
        log.info("tuneloop adapter cache: not installed (%s)", exc)
    if os.environ.get("TUNELOOP_VLLM_GROUPED_LORA", "1") == "0":
        return
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError as exc:  # a vLLM without the CPU wrapper: nothing to patch
        log.info("tuneloop grouped LoRA: not patched (%s)", exc)
        return
    from tuneloop_vllm import lora_ops

    for name in _PATCHED:
        setattr(punica_cpu, name, getattr(lora_ops, name))
    log.info("tuneloop grouped LoRA ops active in vLLM's CPU punica wrapper (pid %d)",
             os.getpid())
