"""Training throughput: tuneloop's LoRA recipe against the trainers users pick.

Three sides train the same base model (the converted SmolLM2-135M-Instruct) with the
same LoRA rank, alpha, target modules, learning rate and schedule (linear warm-up,
cosine to the same floor), number of steps and banking77 examples:

- ``HF Trainer + peft``: the textbook set-up, the chat template, labels masked to the
  answer, ``DataCollatorForSeq2Seq`` padding each batch to its longest example.
- ``TRL SFTTrainer``: prompt-completion chats, BFD packing into rows of the recipe's
  ``max_seq_len`` (padding-free), loss on the completion only; as many packed rows a
  step as hold the recipe's examples a step.
- ``tuneloop recipe``: the recipe the loop trains with.

Each run is a fresh process (``bench._train_worker``); every side times the same scope,
its optimizer steps, and counts the real tokens it trained on. float32 on a CPU, bf16
on a GPU, for all. Two rounds, the order reversed in the second; the figure is each
side's median tokens/s. Validation loss is the token-weighted loss over the answer
tokens of the same held-out examples, computed by one function for every side.

Ends with ``FIGURE train_tokens_ratio=...`` (against the faster baseline),
``FIGURE train_val_loss=...`` and ``FIGURE baseline_val_loss=...`` (that baseline's).
The GPU part (tokens/s and MFU on a ~1B Llama) runs only where CUDA is present. TRL
lives in ``.venv-bench-train``, created on first use on top of the main environment.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from services.settings import Settings

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BENCH_VENV = REPO / ".venv-bench-train"
TRL = ("trl==1.16.0", "datasets==5.2.0")
NAMES = {"hf": "HF Trainer + peft", "trl": "TRL SFTTrainer (packing, completion-only)",
         "recipe": "tuneloop recipe"}


def ensure_bench_venv() -> Path:
    """A virtualenv that sees the main environment's packages and adds TRL."""
    python = BENCH_VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import trl, datasets"],
                                          capture_output=True).returncode == 0:
        return python
    log.info("creating %s with %s (first run only)", BENCH_VENV, " ".join(TRL))
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    main_site = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig."
                                "get_paths()['purelib'])"], capture_output=True, text=True,
                               check=True)
    (Path(site.stdout.strip()) / "tuneloop-main.pth").write_text(main_site.stdout.strip() + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL], check=True)
    return python


def run_side(python: Path, side: str, spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([str(python), "-m", "bench._train_worker", side, json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"bench train: the {side} side failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(lines[-1].removeprefix("RESULT ")))


def main(settings: Settings, quick: bool = False) -> dict[str, float]:
    """Run every side twice, alternated, and print FIGURE lines; returns the figures."""
    python = ensure_bench_venv()
    spec = {"steps": 6 if quick else 30, "batch": 8, "learning_rate": 1e-3, "intents": 12,
            "per_intent": 20}
    order = ["hf", "trl", "recipe"]
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in order}
    for round_ in range(2):
        for side in (order if round_ == 0 else order[::-1]):
            started = time.perf_counter()
            runs[side].append(run_side(python, side, spec))
            log.info("round %d %s: %.0f tokens/s, val loss %.4f (%.0f s in all)", round_ + 1,
                     side, runs[side][-1]["tokens_per_s"], runs[side][-1]["val_loss"],
                     time.perf_counter() - started)
    median = {side: statistics.median(r["tokens_per_s"] for r in rs) for side, rs in runs.items()}
    loss = {side: statistics.median(r["val_loss"] for r in rs) for side, rs in runs.items()}
    from rich.console import Console
    from rich.table import Table

    device = "CUDA bf16" if torch.cuda.is_available() else f"CPU float32, {os.cpu_count()} cores"
    table = Table("side", "tokens/s (median)", "rounds", "step s", "examples/step", "val loss",
                  title=f"LoRA r=16, {spec['steps']} steps, {device}")
    for side in order:
        rs = runs[side]
        table.add_row(NAMES[side], f"{median[side]:.0f}",
                      " / ".join(f"{r['tokens_per_s']:.0f}" for r in rs),
                      f"{statistics.median(r['train_s'] for r in rs) / spec['steps']:.2f}",
                      f"{rs[0]['examples_per_step']:.1f}", f"{loss[side]:.4f}")
    Console().print(table)
    faster = max(("hf", "trl"), key=lambda side: median[side])
    figures = {"train_tokens_ratio": median["recipe"] / median[faster],
               "train_val_loss": loss["recipe"], "baseline_val_loss": loss[faster]}
    print(f"faster baseline: {NAMES[faster]}")  # noqa: T201
    if torch.cuda.is_available():
        figures["gpu_mfu"] = gpu_mfu(quick)
    for name, value in figures.items():
        print(f"FIGURE {name}={value:.4f}")  # noqa: T201 - the bench contract
    return figures


def gpu_mfu(quick: bool) -> float:
    """Model FLOPs utilisation of the recipe's loss step on a ~1B random Llama, in bf16.

    FLOPs per token are taken as 4 x parameters (forward plus input gradients; LoRA
    needs no weight gradients of the frozen base), against the GPU's dense bf16 peak.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    peaks = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in peaks.items() if k in name), 989e12)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                      num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                      max_position_embeddings=2048)
    dense = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)  # type: ignore[call-arg]
    n_params = sum(p.numel() for p in dense.parameters())
    model = get_peft_model(dense, LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows, length = 8, 1024
    ids = torch.randint(0, cfg.vocab_size, (rows, length), device="cuda")
    steps = 5 if quick else 20
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    tokens_per_s = steps * rows * length / (time.perf_counter() - started)
    print(f"gpu {name}: {tokens_per_s:,.0f} tokens/s on a {n_params / 1e9:.2f}B Llama")  # noqa: T201
    return 4 * n_params * tokens_per_s / peak
