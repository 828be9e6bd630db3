"""What the test session trains once and every test shares.

- :func:`tiny_base_model`: a tiny random Llama with SmolLM2's tokenizer, for tests of
  mechanics (resume, idempotency, flows) rather than of learning: a step takes
  milliseconds instead of seconds.
- :func:`train_session_adapters`: the SmolLM2 LoRA adapters on banking77 that the
  training and canary tests judge: ``old`` (six intents), ``flipped`` (the same data, every
  label rotated to the next intent) and ``more`` (the six plus six others), published in
  the session serving stack's registry. When the session runs the demo test, they train
  from the start in the background instead, at the lowest priority
  (:func:`start_trainers`, tests/conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tuneloop.runtime.settings import Settings
from tuneloop.services.demo import banking77
from tuneloop.services.demo.simulation import dataset_rows, write_dataset, write_golden
from tuneloop.services.registry.core import Adapter
from tuneloop.services.store.database import Store
from tuneloop.training.base_model import BaseModel, resolve_base_model
from tuneloop.training.config import DEFAULT_CONFIG, RecipeConfig
from tuneloop.training.pipeline import train_and_publish

INTENTS = sorted(banking77.intents())
OLD = INTENTS[0:60:10]  # six intents spread over the alphabet
NEW = INTENTS[5:65:10]  # six others
STEPS = {"cn-old": 24, "cn-flipped": 24, "cn-more": 64}  # each adapter's training steps


def tiny_base_model(directory: Path, models_dir: Path) -> BaseModel:
    """A two-layer random Llama saved with SmolLM2's tokenizer (so prompts encode alike)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    smol = resolve_base_model("smollm2-135m-instruct", models_dir)
    if not (directory / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(
            vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=2, eos_token_id=2,
            bos_token_id=1, tie_word_embeddings=True,
        )).save_pretrained(directory)
        AutoTokenizer.from_pretrained(smol.path).save_pretrained(directory)
    return BaseModel("tiny", str(directory), "0" * 64)


def short_recipe(steps: int, **overrides: object) -> RecipeConfig:
    """The shipped recipe, made short enough for two CPU cores."""
    return RecipeConfig.from_file(DEFAULT_CONFIG, **{
        "max_steps": steps, "batch_size": 4, "learning_rate": 1e-3, "warmup_ratio": 0.05,
        "eval_interval": steps, "generation_max_new_tokens": 12, **overrides})


@dataclass(frozen=True)
class SessionAdapters:
    old: Adapter
    flipped: Adapter
    more: Adapter
    recipe: dict[str, RecipeConfig]


def write_session_data(settings: Settings) -> None:
    """The golden set and the three adapters' datasets, in ``settings``' store."""
    store = Store(settings.db_path)
    pool = banking77.select(banking77.load("train"), seed=0)
    write_golden(store, banking77.select(banking77.load("test"), seed=1), OLD, per_intent=5)
    for version, intents, flip in (("cn-old", OLD, False), ("cn-flipped", OLD, True),
                                   ("cn-more", OLD + NEW, False)):
        write_dataset(store, version, dataset_rows(version, pool, intents, train=16, val=2,
                                                   test=3, flip=flip))


@dataclass
class Trainers:
    """Session adapters training in processes of their own (``python -m
    tests.session_models VERSION...``), each on its cores, logs beside the store."""

    processes: list[tuple[subprocess.Popen[bytes], Path]]

    def move(self, cores: str) -> None:
        """Every one still training onto ``cores``."""
        from tuneloop.runtime.cpu import bind, parse_cores

        for process, _ in self.processes:
            if process.poll() is None:
                bind(parse_cores(cores), process.pid)

    def wait(self) -> None:
        """Back to normal priority, then until every one has published."""
        for process, log in self.processes:
            for task in Path(f"/proc/{process.pid}/task").glob("*"):
                try:
                    os.setpriority(os.PRIO_PROCESS, int(task.name), 0)
                except OSError:
                    continue  # ended meanwhile
            assert process.wait(timeout=1800) == 0, log.read_text()[-4000:]

    def stop(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def start_trainers(settings: Settings, groups: list[tuple[list[str], str]],
                   niceness: int = 0) -> Trainers:
    """One process per group of versions (trained in turn) on the group's cores; with
    ``niceness`` 19 they take only the time the machine has to spare."""
    processes = []
    for versions, cores in groups:
        log = Path(settings.home) / f"{'+'.join(versions)}.log"
        env = {**os.environ, "TUNELOOP_HOME": str(settings.home),
               "TUNELOOP_TRAINING__CPU_CORES": cores}
        with log.open("w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.session_models", *versions], env=env,
                cwd=Path(__file__).parent.parent, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=(lambda: os.nice(niceness)) if niceness else None)
        processes.append((process, log))
    return Trainers(processes)


def published_adapters(settings: Settings) -> SessionAdapters:
    """The three adapters, trained here if no process published them yet."""
    recipes = {version: short_recipe(steps) for version, steps in STEPS.items()}
    adapters = {version: train_and_publish(settings, version, recipes[version], version,
                                           show_progress=False) for version in STEPS}
    return SessionAdapters(adapters["cn-old"], adapters["cn-flipped"], adapters["cn-more"],
                           recipes)


def train_session_adapters(settings: Settings, spare_cores: str | None = None) -> SessionAdapters:
    """Write the datasets and golden set into ``settings``' store and train the three
    adapters (a rerun finds them published under the same run keys).

    With ``spare_cores`` (the idle serving stack's cores), ``cn-more``, the longest run,
    trains there in a process of its own while this one trains the other two on
    ``training.cpu_cores``.
    """
    write_session_data(settings)
    if spare_cores is not None:
        trainers = start_trainers(settings, [(["cn-more"], spare_cores)])
        for version in ("cn-old", "cn-flipped"):
            train_and_publish(settings, version, short_recipe(STEPS[version]), version,
                              show_progress=False)
        trainers.wait()
    return published_adapters(settings)


if __name__ == "__main__":  # session adapters, in a process of their own (see above)
    from tuneloop.runtime.settings import load_settings

    for name in sys.argv[1:]:
        train_and_publish(load_settings(), name, short_recipe(STEPS[name]), name,
                          show_progress=False)
