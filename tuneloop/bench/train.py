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

Each run is a fresh process (``tuneloop.bench._train_worker``); every side times the same scope,
its optimizer steps, and counts the real tokens it trained on. float32 on a CPU, bf16
on a GPU, for all. Two rounds, the order reversed in the second; the figure is each
side's median tokens/s. Validation loss is the token-weighted loss over the answer
tokens of the same held-out examples, computed by one function for every side.

Ends with ``FIGURE train_tokens_ratio=...`` (against the faster baseline),
``FIGURE train_val_loss=...`` and ``FIGURE baseline_val_loss=...`` (that baseline's).
The GPU part (the recipe's own tokens/s and MFU on a ~1B random-init Llama) runs only
where CUDA is present. TRL lives in a virtualenv of its own in the user's cache
(``~/.cache/tuneloop/bench/``), created on first use on top of the main environment.
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

import tuneloop
from tuneloop.runtime.cache import user_cache_dir
from tuneloop.runtime.settings import Settings

log = logging.getLogger(__name__)

# The folder holding the tuneloop package (a checkout or site-packages): the workers'
# PYTHONPATH and working directory, so they import this very tuneloop.
PACKAGE_ROOT = Path(tuneloop.__file__).resolve().parents[1]
TRL = ("trl==1.16.0", "datasets==5.2.0")
NAMES = {"hf": "HF Trainer + peft", "trl": "TRL SFTTrainer (packing, completion-only)",
         "recipe": "tuneloop recipe"}


def bench_venv() -> Path:
    """Where the TRL virtualenv lives: the user's cache, one per Python version (it runs on
    the interpreter that created it, and sees that version's main environment)."""
    return user_cache_dir("bench") / f"venv-train-py{sys.version_info.major}.{sys.version_info.minor}"


def _see_main_environment(python: Path) -> None:
    """Point the virtualenv at this run's main environment (a ``.pth`` file): the cache is
    shared by every environment on the machine, so it is written on every run."""
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    main_site = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig."
                                "get_paths()['purelib'])"], capture_output=True, text=True,
                               check=True)
    (Path(site.stdout.strip()) / "tuneloop-main.pth").write_text(main_site.stdout.strip() + "\n")


def ensure_bench_venv() -> Path:
    """A virtualenv that sees the main environment's packages and adds TRL; its python."""
    venv = bench_venv()
    python = venv / "bin" / "python"
    if not python.exists():
        log.info("creating %s with %s (first run only)", venv, " ".join(TRL))
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _see_main_environment(python)
    if subprocess.run([str(python), "-c", "import trl, datasets"],
                      capture_output=True).returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL], check=True)
    return python


def run_side(python: Path, side: str, spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_ROOT))
    done = subprocess.run([str(python), "-m", "tuneloop.bench._train_worker", side, json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=PACKAGE_ROOT)
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


# A ~1.1B Llama (TinyLlama's shape) and a tiny one that checks the path on a CPU.
LLAMA_1B: dict[str, Any] = {"hidden_size": 2048, "intermediate_size": 5632,
                            "num_hidden_layers": 22, "num_attention_heads": 32,
                            "num_key_value_heads": 4}
LLAMA_TINY: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128,
                              "num_hidden_layers": 2, "num_attention_heads": 4,
                              "num_key_value_heads": 2}


def gpu_mfu(quick: bool) -> float:
    """Model FLOPs utilisation of the recipe itself on a ~1B random-init Llama, in bf16."""
    return recipe_mfu(LLAMA_1B, steps=5 if quick else 20, batch=128)["mfu"]


def recipe_mfu(shape: dict[str, Any], steps: int, batch: int) -> dict[str, float]:
    """Train a random-init Llama of ``shape`` (SmolLM2's tokenizer) with the recipe on
    banking77 for ``steps`` steps of ``batch`` examples, and take its own tokens/s.

    FLOPs a token are 4 x the parameters outside the input embedding (forward, plus the
    input gradients; LoRA needs no weight gradients of the frozen base), against the
    GPU's dense bf16 peak (on a CPU the figure is tokens/s only, its MFU 0).
    """
    import tempfile

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tuneloop.bench._train_worker import examples, recipe_config
    from tuneloop.runtime.settings import load_settings
    from tuneloop.training.base_model import EMBEDDED_ID, BaseModel, resolve_base_model
    from tuneloop.training.recipe import LoRARecipe

    settings = load_settings()
    tokenizer_from = resolve_base_model(EMBEDDED_ID, settings.models_dir).path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-mfu-") as tmp:
        base_dir = Path(tmp) / "base"
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048,
                             tie_word_embeddings=False, **shape)
        model = LlamaForCausalLM(config)
        n_params = sum(p.numel() for name, p in model.named_parameters()
                       if "embed_tokens" not in name)
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        del model
        base = BaseModel(f"random Llama {n_params / 1e9:.2f}B", str(base_dir), "random-init")
        train = examples(77, max(1, -(-batch * steps // 77)), "train", seed=0)
        validation = examples(77, 1, "test", seed=1)
        recipe = LoRARecipe(recipe_config({"steps": steps, "batch": batch,
                                           "learning_rate": 1e-4}),
                            base, Path(tmp) / "run", run_id="bench-mfu", show_progress=False)
        recipe.setup(train, validation)
        result = recipe.train()
        recipe.cleanup()
    cuda = torch.cuda.is_available()
    peaks = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in peaks.items() if k in name), 989e12) if cuda else 0.0
    mfu = 4 * n_params * result.tokens_per_s / peak if peak else 0.0
    memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    print(f"recipe on {name}: {result.tokens_per_s:,.0f} tokens/s on a "  # noqa: T201
          f"{n_params / 1e9:.2f}B Llama, {batch} examples a step, MFU {mfu:.3f}, "
          f"peak memory {memory:.1f} GiB")
    return {"tokens_per_s": result.tokens_per_s, "mfu": mfu, "params": float(n_params)}
