"""The ``tuneloop adapters`` commands on a real DuckDB file and a real PEFT adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tuneloop.cli.main import app
from tuneloop.services.registry import store as registry
from tuneloop.services.store.database import Store

pytestmark = pytest.mark.integration


def _tiny_peft_adapter(directory: Path, seed: int) -> Path:
    """A real peft LoRA adapter of a tiny random Llama, saved as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                                  target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def test_adapters_commands(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = Store(home / "tuneloop.duckdb")
    with store.connect() as con:
        for n in (1, 2):
            registry.publish_adapter(
                con, home / "adapters", _tiny_peft_adapter(tmp_path / f"src{n}", n),
                alias="support-bot", base_model="tiny", base_hash="0" * 64,
                dataset_version=f"ds{n}", run_key=f"run{n}",
                details={"metrics": {"golden": {"accuracy": 0.5 * n}}},
            )
    runner = CliRunner()

    def cli(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, ["--home", str(home), *args])
        return result.exit_code, result.output

    code, out = cli("adapters", "list")
    assert code == 0 and "support-bot-v1" in out and "support-bot-v2" in out
    assert cli("adapters", "verify")[0] == 0
    assert cli("adapters", "promote", "v1", "--reason", "first")[0] == 0
    assert cli("adapters", "promote", "v2", "--to", "canary", "--reason", "try v2")[0] == 0
    assert cli("adapters", "promote", "v2", "--reason", "canary passed")[0] == 0
    code, out = cli("adapters", "rollback", "--reason", "error rate up")
    assert code == 0 and "v1: retired -> production" in out
    code, out = cli("adapters", "promote", "v2", "--reason", "again")
    assert code == 2 and "rejected" in out
    code, out = cli("adapters", "show", "v2")
    assert code == 0 and '"rollback"' in out and "ds2" in out

    weights = home / "adapters" / "v1" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, out = cli("adapters", "verify", "v1")
    assert code == 1 and "FAILED" in out
    code, out = cli("adapters", "promote", "v1", "--to", "production", "--reason", "x")
    assert code == 2
