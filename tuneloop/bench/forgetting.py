"""Learning without forgetting: which retrain recipe keeps the old intents and learns the new.

The loop's retrain after a shift trains on the new feedback (old and new intents mixed,
as traffic is) plus examples replayed from the previous dataset version. This benchmark
runs that retrain four ways on the same data and measures macro-F1 on held-out queries
of the old and the new intents (test split, never trained on), with the training recipe's
own generation:

- ``fresh / share 0.2``: a new adapter from zeros, 20% of train replayed, no per-label
  floor (how tuneloop retrained before the loop).
- ``fresh / half, 8 per label``: from zeros, half of train replayed, at least 8
  examples of every old label.
- ``continued / share 0.2``: continued training from the production adapter, 20%
  replayed round-robin over the old labels with at least ``curation.replay_per_label``
  (4) of each: tuneloop's default.
- ``continued / half, 8 per label``: continued, with the larger replay.

The baseline is the production adapter before the retrain. Intents are drawn at random
(seeded) from the data, not chosen by name. Ends with
``FIGURE forgetting_old_f1_delta=<points>`` and ``FIGURE forgetting_new_f1=<x>`` for
the default recipe (continued, share 0.2), and one row per variant. Each retrain runs
the same number of steps.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from tuneloop.bench.ingest import machine
from tuneloop.runtime.settings import CurationSettings, Settings
from tuneloop.services.curation.core import Example, GoldenIndex, prompt_key, replay
from tuneloop.services.demo import banking77
from tuneloop.services.demo.banking77 import Query
from tuneloop.training.base_model import BaseModel, resolve_base_model
from tuneloop.training.config import DEFAULT_CONFIG, RecipeConfig
from tuneloop.training.dataset import ChatExample
from tuneloop.training.recipe import LoRARecipe


def _say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the bench's report


def _chat(q: Query, i: int, tag: str) -> ChatExample:
    messages = [m.model_dump() for m in banking77.chat(q.text)]
    messages.append({"role": "assistant", "content": q.intent})
    return ChatExample(f"{tag}-{i}", tuple(messages), q.intent, q.intent)


def _example(c: ChatExample) -> Example:
    return Example(c.example_id, c.example_id, c.label, list(c.messages),
                   c.messages[-2]["content"], c.completion)


def _back(e: Example) -> ChatExample:
    return ChatExample(e.example_id, tuple(e.messages), e.completion, e.label)


@dataclass(frozen=True)
class _Sizes:
    """How many intents, examples and steps a run uses."""

    n_old: int
    n_new: int
    per_intent: int
    held_out: int
    boot_steps: int
    retrain_steps: int

    @classmethod
    def of(cls, quick: bool) -> _Sizes:
        n_old, n_new = (8, 4) if quick else (24, 8)
        boot_steps, retrain_steps = (24, 16) if quick else (100, 60)
        return cls(n_old, n_new, 12 if quick else 20, 5 if quick else 10, boot_steps,
                   retrain_steps)


@dataclass(frozen=True)
class _Data:
    """The bootstrap's, the post-shift retrain's and the held-out evaluation's examples."""

    boot_train: list[ChatExample]
    boot_val: list[ChatExample]
    shift_train: list[ChatExample]
    shift_val: list[ChatExample]
    eval_old: list[ChatExample]
    eval_new: list[ChatExample]


class _Row(NamedTuple):
    name: str
    replayed: int
    labels: int
    old_f1: float
    new_f1: float
    seconds: float


# (name, continued from the production adapter, replay settings); the third is the default.
VARIANTS: list[tuple[str, bool, CurationSettings]] = [
    ("fresh / share 0.2", False, CurationSettings(replay_share=0.2, replay_per_label=0)),
    ("fresh / half, 8 per label", False, CurationSettings(replay_share=0.5, replay_per_label=8)),
    ("continued / share 0.2", True, CurationSettings()),
    ("continued / half, 8 per label", True, CurationSettings(replay_share=0.5,
                                                              replay_per_label=8)),
]
DEFAULT_VARIANT = 2


def _pick(pool: list[Query], names: list[str], n: int, offset: int) -> list[Query]:
    """``n`` queries of each intent in ``names``, from the ``offset``-th on."""
    out = []
    for name in names:
        out += [q for q in pool if q.intent == name][offset:offset + n]
    return out


def _data(sizes: _Sizes) -> _Data:
    """Old and new intents drawn at random (seeded), and every example set built from them."""
    rng = random.Random(7)
    intents = banking77.intents()
    rng.shuffle(intents)
    old, new = intents[:sizes.n_old], intents[sizes.n_old:sizes.n_old + sizes.n_new]
    per_intent = sizes.per_intent
    train = banking77.load("train")
    test = banking77.load("test")
    # Post-shift traffic: half from the new intents, half from the old, all labelled.
    shift = _pick(train, new, per_intent, 0) + _pick(train, old, per_intent // 2, per_intent + 2)

    def chats(queries: list[Query], tag: str) -> list[ChatExample]:
        return [_chat(q, i, tag) for i, q in enumerate(queries)]

    return _Data(
        boot_train=chats(_pick(train, old, per_intent, 0), "boot"),
        boot_val=chats(_pick(train, old, 2, per_intent), "bval"),
        shift_train=chats(shift, "shift"),
        shift_val=chats(_pick(train, new, 2, per_intent), "sval"),
        eval_old=chats(_pick(test, old, sizes.held_out, 0), "eold"),
        eval_new=chats(_pick(test, new, sizes.held_out, 0), "enew"),
    )


@dataclass(frozen=True)
class _Trainer:
    """Trains one adapter in ``work`` and scores it on the old and the new intents."""

    config: RecipeConfig
    base: BaseModel
    work: Path
    data: _Data

    def run(self, name: str, examples: list[ChatExample], val: list[ChatExample], steps: int,
            init: Path | None) -> tuple[Path, float, float, float]:
        """Train ``steps`` steps (from ``init`` when given); returns the adapter's path, old
        and new macro-F1 and the seconds it took."""
        recipe = LoRARecipe(self.config.replace(max_steps=steps), self.base, self.work / name,
                            run_id=name, show_progress=False, init_adapter=init)
        started = time.perf_counter()
        try:
            recipe.setup(examples, val)
            recipe.train()
            old_f1 = recipe.evaluate(self.data.eval_old)[0].macro_f1 or 0.0
            new_f1 = recipe.evaluate(self.data.eval_new)[0].macro_f1 or 0.0
            recipe.save_adapter(self.work / name / "adapter")
        finally:
            recipe.cleanup()
        return self.work / name / "adapter", old_f1, new_f1, time.perf_counter() - started


def _retrains(trainer: _Trainer, sizes: _Sizes, prod: Path, before_old: float) -> list[_Row]:
    """Every variant's retrain on the post-shift traffic plus its replay of the bootstrap's."""
    data = trainer.data
    previous = [_example(c) for c in data.boot_train]
    new_examples = [_example(c) for c in data.shift_train]
    keys = {prompt_key(e.prompt) for e in new_examples}
    nothing = GoldenIndex()
    rows = []
    for name, continued, cfg in VARIANTS:
        replayed = replay(previous, len(new_examples), cfg, keys, nothing)
        examples = data.shift_train + [_back(e) for e in replayed]
        slug = name.replace(" / ", "-").replace(" ", "")
        _, old_f1, new_f1, secs = trainer.run(
            slug, examples, data.shift_val + data.boot_val[:len(data.shift_val)],
            sizes.retrain_steps, prod if continued else None)
        rows.append(_Row(name, len(replayed), len({e.label for e in replayed}), old_f1, new_f1,
                         secs))
        _say(f"{name}: replayed {len(replayed)} ({rows[-1].labels} labels); old macro-F1 "
             f"{old_f1:.3f} ({100 * (old_f1 - before_old):+.1f} points), new {new_f1:.3f} "
             f"({secs:.0f} s)")
    return rows


def _report(rows: list[_Row], before_old: float, before_new: float) -> None:
    """The table, one pair of FIGURE lines per variant and the default's two figures."""
    _say("")
    _say("| retrain | replayed (labels) | old macro-F1 | delta (points) | new macro-F1 |")
    _say("| --- | --- | --- | --- | --- |")
    _say(f"| production, before | - | {before_old:.3f} | - | {before_new:.3f} |")
    for name, n, labels, old_f1, new_f1, _ in rows:
        _say(f"| {name} | {n} ({labels}) | {old_f1:.3f} | {100 * (old_f1 - before_old):+.1f} | "
             f"{new_f1:.3f} |")
    default = rows[DEFAULT_VARIANT]
    for name, _, _, old_f1, new_f1, _ in rows:
        slug = name.replace(" / ", "_").replace(", ", "_").replace(" ", "_").replace(".", "")
        _say(f"FIGURE forgetting_{slug}_old_delta={100 * (old_f1 - before_old):.1f}")
        _say(f"FIGURE forgetting_{slug}_new_f1={new_f1:.3f}")
    _say(f"FIGURE forgetting_old_f1_delta={100 * (default.old_f1 - before_old):.1f}")
    _say(f"FIGURE forgetting_new_f1={default.new_f1:.3f}")


def main(settings: Settings, quick: bool = False) -> None:
    """Bootstrap a production adapter, retrain it every variant's way, print the report."""
    sizes = _Sizes.of(quick)
    data = _data(sizes)
    base = resolve_base_model(settings.training.base_model, settings.models_dir)
    config = RecipeConfig.from_file(DEFAULT_CONFIG.parent / "demo.yaml",
                                    task_eval_max_examples=len(data.eval_old) + len(data.eval_new))
    work = Path(tempfile.mkdtemp(prefix="tuneloop-forgetting-"))
    _say(f"machine: {machine()}")
    _say(f"old intents {sizes.n_old}, new {sizes.n_new}; bootstrap {len(data.boot_train)} "
         f"examples x {sizes.boot_steps} steps; retrain {len(data.shift_train)} new examples + "
         f"replay x {sizes.retrain_steps} steps; held-out {sizes.held_out} test queries per "
         "intent")
    trainer = _Trainer(config, base, work, data)
    try:
        prod, before_old, before_new, boot_s = trainer.run(
            "bootstrap", data.boot_train, data.boot_val, sizes.boot_steps, None)
        _say(f"production adapter: old macro-F1 {before_old:.3f}, new {before_new:.3f} "
             f"({boot_s:.0f} s)")
        rows = _retrains(trainer, sizes, prod, before_old)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(rows, before_old, before_new)
