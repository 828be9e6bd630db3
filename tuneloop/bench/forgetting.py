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
from pathlib import Path

from tuneloop.bench.ingest import machine
from tuneloop.runtime.settings import CurationSettings, Settings
from tuneloop.services.curation.core import Example, GoldenIndex, prompt_key, replay
from tuneloop.services.demo import banking77
from tuneloop.services.demo.banking77 import Query
from tuneloop.training.base_model import resolve_base_model
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


def main(settings: Settings, quick: bool = False) -> None:
    rng = random.Random(7)
    intents = banking77.intents()
    rng.shuffle(intents)
    n_old, n_new = (8, 4) if quick else (24, 8)
    old, new = intents[:n_old], intents[n_old:n_old + n_new]
    per_intent = 12 if quick else 20
    held_out = 5 if quick else 10
    boot_steps, retrain_steps = (24, 16) if quick else (100, 60)
    train = banking77.load("train")
    test = banking77.load("test")

    def pick(pool: list[Query], names: list[str], n: int, offset: int) -> list[Query]:
        out = []
        for name in names:
            out += [q for q in pool if q.intent == name][offset:offset + n]
        return out

    boot_train = [_chat(q, i, "boot") for i, q in enumerate(pick(train, old, per_intent, 0))]
    boot_val = [_chat(q, i, "bval") for i, q in enumerate(pick(train, old, 2, per_intent))]
    # Post-shift traffic: half from the new intents, half from the old, all labelled.
    shift = pick(train, new, per_intent, 0) + pick(train, old, per_intent // 2, per_intent + 2)
    shift_train = [_chat(q, i, "shift") for i, q in enumerate(shift)]
    shift_val = [_chat(q, i, "sval") for i, q in enumerate(pick(train, new, 2, per_intent))]
    eval_old = [_chat(q, i, "eold") for i, q in enumerate(pick(test, old, held_out, 0))]
    eval_new = [_chat(q, i, "enew") for i, q in enumerate(pick(test, new, held_out, 0))]

    base = resolve_base_model(settings.training.base_model, settings.models_dir)
    config = RecipeConfig.from_file(DEFAULT_CONFIG.parent / "demo.yaml",
                                    task_eval_max_examples=len(eval_old) + len(eval_new))
    work = Path(tempfile.mkdtemp(prefix="tuneloop-forgetting-"))
    _say(f"machine: {machine()}")
    _say(f"old intents {n_old}, new {n_new}; bootstrap {len(boot_train)} examples x "
         f"{boot_steps} steps; retrain {len(shift_train)} new examples + replay x "
         f"{retrain_steps} steps; held-out {held_out} test queries per intent")

    def run(name: str, examples: list[ChatExample], val: list[ChatExample], steps: int,
            init: Path | None) -> tuple[Path, float, float, float]:
        recipe = LoRARecipe(config.replace(max_steps=steps), base, work / name,
                            run_id=name, show_progress=False, init_adapter=init)
        started = time.perf_counter()
        try:
            recipe.setup(examples, val)
            recipe.train()
            old_f1 = recipe.evaluate(eval_old)[0].macro_f1 or 0.0
            new_f1 = recipe.evaluate(eval_new)[0].macro_f1 or 0.0
            recipe.save_adapter(work / name / "adapter")
        finally:
            recipe.cleanup()
        return work / name / "adapter", old_f1, new_f1, time.perf_counter() - started

    try:
        prod, before_old, before_new, boot_s = run("bootstrap", boot_train, boot_val,
                                                   boot_steps, None)
        _say(f"production adapter: old macro-F1 {before_old:.3f}, new {before_new:.3f} "
             f"({boot_s:.0f} s)")
        previous = [_example(c) for c in boot_train]
        new_examples = [_example(c) for c in shift_train]
        keys = {prompt_key(e.prompt) for e in new_examples}
        nothing = GoldenIndex()
        variants = [
            ("fresh / share 0.2", False, CurationSettings(replay_share=0.2, replay_per_label=0)),
            ("fresh / half, 8 per label", False, CurationSettings(replay_share=0.5,
                                                                  replay_per_label=8)),
            ("continued / share 0.2", True, CurationSettings()),
            ("continued / half, 8 per label", True, CurationSettings(replay_share=0.5,
                                                                      replay_per_label=8)),
        ]
        rows = []
        for name, continued, cfg in variants:
            replayed = replay(previous, len(new_examples), cfg, keys, nothing)
            data = shift_train + [_back(e) for e in replayed]
            slug = name.replace(" / ", "-").replace(" ", "")
            _, old_f1, new_f1, secs = run(slug, data, shift_val + boot_val[:len(shift_val)],
                                          retrain_steps, prod if continued else None)
            rows.append((name, len(replayed), len({e.label for e in replayed}), old_f1, new_f1,
                         secs))
            _say(f"{name}: replayed {len(replayed)} ({rows[-1][2]} labels); old macro-F1 "
                 f"{old_f1:.3f} ({100 * (old_f1 - before_old):+.1f} points), new {new_f1:.3f} "
                 f"({secs:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    _say("")
    _say("| retrain | replayed (labels) | old macro-F1 | delta (points) | new macro-F1 |")
    _say("| --- | --- | --- | --- | --- |")
    _say(f"| production, before | - | {before_old:.3f} | - | {before_new:.3f} |")
    for name, n, labels, old_f1, new_f1, _ in rows:
        _say(f"| {name} | {n} ({labels}) | {old_f1:.3f} | {100 * (old_f1 - before_old):+.1f} | "
             f"{new_f1:.3f} |")
    default = rows[2]
    for name, _, _, old_f1, new_f1, _ in rows:
        slug = name.replace(" / ", "_").replace(", ", "_").replace(" ", "_").replace(".", "")
        _say(f"FIGURE forgetting_{slug}_old_delta={100 * (old_f1 - before_old):.1f}")
        _say(f"FIGURE forgetting_{slug}_new_f1={new_f1:.3f}")
    _say(f"FIGURE forgetting_old_f1_delta={100 * (default[3] - before_old):.1f}")
    _say(f"FIGURE forgetting_new_f1={default[4]:.3f}")
