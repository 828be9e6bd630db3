"""Real PEFT LoRA adapter directories for a base model, written directly (no training).

The serving tests need adapters that vLLM loads and that change the answers, of a
chosen rank, fast: the tensors are drawn from a seeded generator in the layout peft
saves (``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_lora(base_dir: str | Path, out: Path, *, rank: int = 8, seed: int = 0,
               scale: float = 0.02) -> Path:
    """A LoRA on q_proj and v_proj of every layer of the Llama at ``base_dir``."""
    config = json.loads((Path(base_dir) / "config.json").read_text())
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    outs = {"q_proj": config["num_attention_heads"] * head_dim,
            "v_proj": config["num_key_value_heads"] * head_dim}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out_dim in outs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * scale
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "lora_dropout": 0.0, "target_modules": list(outs), "bias": "none",
        "base_model_name_or_path": str(base_dir), "fan_in_fan_out": False,
        "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }, indent=2))
    return out
