"""What the test session trains once and every test shares.

- :func:`tiny_base_model`: a tiny random Llama with SmolLM2's tokenizer, for tests of
  mechanics (resume, idempotency, flows) rather than of learning: a step takes
  milliseconds instead of seconds.
- :func:`train_session_adapters`: the SmolLM2 LoRA adapters on banking77 that the
  training and canary tests judge: ``old`` (six intents), ``flipped`` (the same data, every
  label rotated to the next intent) and ``more`` (the six plus six others), published in
  the session serving stack's registry.
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


def train_session_adapters(settings: Settings, spare_cores: str | None = None) -> SessionAdapters:
    """Write the datasets and golden set into ``settings``' store and train the three
    adapters (a rerun finds them published under the same run keys).

    With ``spare_cores`` (the idle serving stack's cores), ``cn-more``, the longest run,
    trains there in a process of its own while this one trains the other two on
    ``training.cpu_cores``: the cores take turns only when the session starts serving.
    """
    store = Store(settings.db_path)
    pool = banking77.select(banking77.load("train"), seed=0)
    write_golden(store, banking77.select(banking77.load("test"), seed=1), OLD, per_intent=5)
    recipes = {version: short_recipe(steps) for version, steps in STEPS.items()}
    for version, intents, flip in (("cn-old", OLD, False), ("cn-flipped", OLD, True),
                                   ("cn-more", OLD + NEW, False)):
        write_dataset(store, version, dataset_rows(version, pool, intents, train=16, val=2,
                                                   test=3, flip=flip))
    beside = None
    log = Path(settings.home) / "cn-more.log"
    if spare_cores is not None:
        env = {**os.environ, "TUNELOOP_HOME": str(settings.home),
               "TUNELOOP_TRAINING__CPU_CORES": spare_cores}
        with log.open("w") as out:
            beside = subprocess.Popen([sys.executable, "-m", "tests.session_models", "cn-more"],
                                      env=env, cwd=Path(__file__).parent.parent, stdout=out,
                                      stderr=subprocess.STDOUT)
    adapters = {version: train_and_publish(settings, version, recipes[version], version,
                                           show_progress=False)
                for version in ("cn-old", "cn-flipped")}
    if beside is not None:
        assert beside.wait(timeout=1800) == 0, log.read_text()[-4000:]
    adapters["cn-more"] = train_and_publish(settings, "cn-more", recipes["cn-more"], "cn-more",
                                            show_progress=False)  # found published above
    return SessionAdapters(adapters["cn-old"], adapters["cn-flipped"], adapters["cn-more"],
                           recipes)


if __name__ == "__main__":  # one session adapter, in a process of its own (see above)
    from tuneloop.runtime.settings import load_settings

    train_and_publish(load_settings(), sys.argv[1], short_recipe(STEPS[sys.argv[1]]),
                      sys.argv[1], show_progress=False)
