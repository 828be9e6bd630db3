"""Faults around what the gateway serves and is told: a gateway killed with sampled events
and shadow pairs in flight, a canary whose files vanish, and a flood of forged feedback.

Each needs an adapter besides the base model: :func:`new_version` publishes a copy of the
newest adapter in the registry (the worker-kill fault's retrain) as a fresh version.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tuneloop.bench._faults_stack import Bench, Outcome, in_threads
from tuneloop.infra.supervisor import read_state
from tuneloop.runtime.processes import wait_until
from tuneloop.services.demo import banking77

REQUEST_LIMIT_S = 60.0
SERVED = "gateway.served"


def new_version(b: Bench) -> str:
    """A copy of the registry's newest adapter, published as a new version (a candidate)."""
    from tuneloop.services.demo.simulation import republish
    from tuneloop.services.registry.store import list_adapters

    with b.store.connect() as con:
        newest = max(list_adapters(con, b.settings.serving.alias), key=lambda a: a.created_at)
    return republish(b.settings, newest.version)


@dataclass
class Answered:
    """What users got: (version, response id, feedback token) per answer."""

    answers: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def ask(b: Bench, user: str, out: Outcome | None = None) -> tuple[str, str, str]:
    """One question as ``user`` through the official client; (version, response id, token).
    Retries what the gateway says is retriable and connection errors (a gateway being
    restarted), counting them on ``out``; raises on anything else."""
    import openai

    client = openai.OpenAI(base_url=f"{b.settings.serving.gateway_url}/v1", api_key="unused",
                           max_retries=0, timeout=REQUEST_LIMIT_S)
    chat: Any = [m.model_dump() for m in banking77.chat("My card still has not arrived")]
    deadline = time.monotonic() + 600
    if out is not None:
        out.requests += 1
    while True:
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=b.settings.serving.alias, messages=chat, max_tokens=4, temperature=0,
                user=user)
            return (raw.headers["x-tuneloop-adapter-version"],
                    raw.headers["x-tuneloop-response-id"],
                    raw.headers["x-tuneloop-feedback-token"])
        except openai.APIStatusError as exc:
            if exc.status_code != 503 or "retry-after" not in exc.response.headers or \
                    time.monotonic() > deadline:
                raise
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise
        if out is not None:
            out.retried += 1
        time.sleep(1.0)


@contextmanager
def asking(b: Bench, out: Outcome, got: Answered, workers: int = 2) -> Iterator[None]:
    """Users asking until the block ends; each answer is kept in ``got``."""
    def user(stop: threading.Event, worker: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                answer = ask(b, f"bench-user-{worker}-{i}", out)
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                out.failed += 1
                out.failures.append(f"{type(exc).__name__}: {str(exc)[:120]}")
                continue
            with got.lock:
                got.answers.append(answer)

    with in_threads(user, workers, REQUEST_LIMIT_S + 10):
        yield


def _answers_again(b: Bench) -> bool:
    try:
        health = httpx.get(f"{b.settings.serving.gateway_url}/health", timeout=5)
    except httpx.HTTPError:
        return False
    return health.status_code == 200


def gateway_kill_in_flight(b: Bench) -> Outcome:
    """SIGKILL the gateway while users ask with every answer sampled as an event and
    shadowed by a candidate: every answer a user got must reach the store once as a
    served event and once as a shadow pair, and feedback on an answer from before the
    kill must still be taken."""
    from tuneloop.serving.control import GatewayAdmin, promote, reject

    out = Outcome("gateway SIGKILL with sampled and shadow events in flight")
    candidate = new_version(b)
    promote(b.settings, candidate, "canary", "bench faults: a shadow through a gateway kill")
    admin = GatewayAdmin(b.settings)
    admin.set_route(canary_share=0.0, shadow_share=1.0)
    got = Answered()
    try:
        with asking(b, out, got):
            wait_until(lambda: len(got.answers) >= 6, 300, "answers before the kill")
            child = int((read_state(b.home, "gateway") or {})["child_pid"])
            os.kill(child, signal.SIGKILL)
            killed_at = time.monotonic()
            before_kill = list(got.answers)
            time.sleep(2)
            wait_until(lambda: _answers_again(b), 600, "the restarted gateway", interval_s=1.0)
            back_after = time.monotonic() - killed_at
            n = len(got.answers)
            wait_until(lambda: len(got.answers) >= n + 6, 300, "answers after the restart")
        _, response_id, token = before_kill[-1]
        late = httpx.post(f"{b.settings.serving.gateway_url}/v1/feedback", timeout=30,
                          json={"response_id": response_id, "token": token, "rating": 1})
        ids = [r for _, r, _ in got.answers]
        served, pairs = _landed(b, ids)
    finally:
        admin.set_route(shadow_share=0.0)
        reject(b.settings, candidate, "bench faults: the shadow drill is over")
    out.sent = 2 * len(ids)  # a served event and a shadow pair per answer
    out.stored = sum(min(n, 1) for n in served.values()) + sum(min(n, 1) for n in pairs.values())
    out.duplicated = sum(max(0, n - 1) for n in [*served.values(), *pairs.values()])
    out.recovered = late.status_code == 202
    out.detail = (f"killed the gateway (pid {child}) after {len(before_kill)} answers; serving "
                  f"again after {back_after:.0f} s; {len(ids)} answers in all: "
                  f"{sum(1 for n in served.values() if n)} served events and "
                  f"{sum(1 for n in pairs.values() if n)} shadow pairs landed; feedback on an "
                  f"answer from before the kill: HTTP {late.status_code}")
    return out


def _landed(b: Bench, response_ids: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Served events and shadow pairs per response id, once all landed (or 120 s passed)."""
    from tuneloop.services.ingest.shadow import land_shadow_pairs
    from tuneloop.services.ingest.store import events_per_request, pairs_per_response

    deadline = time.monotonic() + 120
    while True:
        land_shadow_pairs(b.settings)
        with b.store.connect() as con:
            served = events_per_request(con, response_ids, SERVED)
            pairs = pairs_per_response(con, response_ids)
        if all(served.values()) and all(pairs.values()) or time.monotonic() > deadline:
            return served, pairs
        time.sleep(2)


def vanishing_canary(b: Bench) -> Outcome:
    """A canary's files vanish, then vLLM forgets it and the gateway restarts (as after a
    reboot): production must go on serving everyone, the canary taken off the route and
    the detour recorded and shown."""
    from tuneloop.serving.control import GatewayAdmin, promote, reject

    out = Outcome("canary version whose files vanish")
    candidate = new_version(b)
    promote(b.settings, candidate, "canary", "bench faults: the canary that will vanish")
    admin = GatewayAdmin(b.settings)
    admin.set_route(canary_share=0.5)
    directory = Path(b.settings.adapters_dir) / candidate
    aside = directory.with_name(f".gone-{candidate}")
    got = Answered()
    try:
        with asking(b, out, got):
            wait_until(lambda: len(got.answers) >= 6, 300, "answers before the files vanish")
            directory.rename(aside)
            _forget(b, candidate)
            os.kill(int((read_state(b.home, "gateway") or {})["child_pid"]), signal.SIGKILL)
            gone_at = time.monotonic()
            n = len(got.answers)
            wait_until(lambda: len(got.answers) >= n + 10, 600, "answers after the restart")
            back_after = time.monotonic() - gone_at
        state = admin.state()
        route = next(r for r in state["routes"] if r["alias"] == b.settings.serving.alias)
        degraded = [d for d in state.get("degraded", []) if d.get("version") == candidate]
        after = {v for v, _, _ in got.answers[n:]}
    finally:
        if aside.exists():
            aside.rename(directory)
        reject(b.settings, candidate, "bench faults: the vanishing-canary drill is over")
    out.recovered = route["candidate"] is None and bool(degraded) and candidate not in after
    out.detail = (f"canary {candidate} lost its files and the gateway restarted; answers again "
                  f"after {back_after:.0f} s from {sorted(after)}; route candidate "
                  f"{route['candidate']}; degraded {[d.get('role') for d in degraded]}")
    return out


def _forget(b: Bench, version: str) -> None:
    """Unload ``version`` from every vLLM replica, as a vLLM restart would."""
    from tuneloop.services.registry.core import vllm_name
    from tuneloop.serving.vllm_process import vllm_key

    key = vllm_key(b.settings)
    for url in b.settings.serving.upstream_urls():
        httpx.post(f"{url}/v1/unload_lora_adapter", timeout=30,
                   json={"lora_name": vllm_name(b.settings.serving.alias, version)},
                   headers={"Authorization": f"Bearer {key}"})


def forged_feedback(b: Bench, honest_users: int = 40, forged: int = 200) -> tuple[Outcome, bool]:
    """The forger's script against a live canary: honest users rate the one answer each
    got (+1); the forger finds a user the canary answers and rates every answer -1 twice,
    guesses other users' tokens, and writes ratings of the canary to Kafka dressed as the
    gateway's. Returns the outcome and whether the live verdict is the one the honest
    users' ratings alone give."""
    from tuneloop.services.canary.live import Side, live_decision
    from tuneloop.serving.canary.live import window
    from tuneloop.serving.control import GatewayAdmin, promote, reject

    out = Outcome("flood of forged feedback on a live canary")
    candidate = new_version(b)
    promote(b.settings, candidate, "canary", "bench faults: the forgery drill")
    admin = GatewayAdmin(b.settings)
    admin.set_route(canary_share=0.5)
    started = time.time() - 1
    url = f"{b.settings.serving.gateway_url}/v1/feedback"
    honest: dict[str | None, int] = {}
    statuses: dict[int, int] = {}

    def rate(response_id: str, token: str, rating: int, **extra: Any) -> None:
        status = httpx.post(url, timeout=30, json={"response_id": response_id, "token": token,
                                                   "rating": rating, **extra}).status_code
        statuses[status] = statuses.get(status, 0) + 1

    try:
        for u in range(honest_users):
            version, response_id, token = ask(b, f"honest-{u}", out)
            rate(response_id, token, 1)
            side = None if version == "base" else version
            honest[side] = honest.get(side, 0) + 1
        mallory = next(u for u in (f"mallory-{i}" for i in range(100))
                       if ask(b, u, out)[0] == candidate)
        for _ in range(30):
            _, response_id, token = ask(b, mallory, out)
            for _ in range(2):
                rate(response_id, token, -1, correction="nonsense")
            rate(response_id, "f" * 32, -1)  # a guessed token
        dead_before = b.dead_letters()
        ids = _forge_on_kafka(b, candidate, forged)
        out.sent = len(ids)
        incumbent = None
        counted = _wait_for_ratings(b, candidate, incumbent, started, sum(honest.values()))
        now = time.time()
        cand, inc = window(b.settings, candidate, incumbent, started, now)
        verdict = live_decision(candidate, incumbent, cand, inc, now - started, b.settings.canary)
        fair = live_decision(candidate, incumbent,
                             Side(cand.requests, cand.errors, cand.latencies_s,
                                  honest.get(candidate, 0), 0),
                             Side(inc.requests, inc.errors, inc.latencies_s,
                                  honest.get(incumbent, 0), 0),
                             now - started, b.settings.canary)
    finally:
        reject(b.settings, candidate, "bench faults: the forgery drill is over")
        admin.set_route(canary_share=0.0)
    # The forged Kafka events are valid events: stored (not lost), never counted as ratings.
    b.caught_up(120)
    b.count(out, ids, dead_before)
    decided_by_honest = verdict.verdict == fair.verdict and verdict.verdict != "rollback"
    out.recovered = decided_by_honest
    out.detail = (f"{honest_users} honest users rated +1 ({honest}); the forger rated 30 canary "
                  f"answers -1 twice and guessed tokens (HTTP statuses {statuses}) and wrote "
                  f"{forged} forged ratings to Kafka; counted ratings (rated, bad) {counted}; "
                  f"live verdict {verdict.verdict}, on the honest ratings alone {fair.verdict}")
    return out, decided_by_honest


def _forge_on_kafka(b: Bench, candidate: str, n: int) -> set[str]:
    from tuneloop.services.feedback.producer import FeedbackProducer

    chat = [m.model_dump() for m in banking77.chat("My card still has not arrived")]
    with FeedbackProducer(b.settings, outbox_path=Path(b.home) / "forger.sqlite") as producer:
        events = [{"schema_version": 1, "event_id": str(uuid.uuid4()),
                   "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                   "app": b.settings.serving.alias, "request_id": f"resp-forged-{i}",
                   "adapter_version": candidate, "messages": chat, "completion": "x",
                   "rating": -1, "user_id": f"forged-{i}", "metadata": {
                       "source": "gateway.feedback", "gateway_signature": "0" * 64}}
                  for i in range(n)]
        producer.send_many(events)
        if not producer.flush(60).complete:
            raise RuntimeError("the forged events did not reach the broker")
    return {str(e["event_id"]) for e in events}


def _wait_for_ratings(b: Bench, candidate: str, incumbent: str | None, since: float,
                      honest: int) -> dict[str | None, tuple[int, int]]:
    """The live window's rating counts once ingest has landed the honest verdicts."""
    from tuneloop.serving.canary.live import ratings

    deadline = time.monotonic() + 120
    while True:
        counted = ratings(b.settings, [candidate, incumbent], since)
        if sum(n for n, _ in counted.values()) >= honest or time.monotonic() > deadline:
            return counted
        time.sleep(2)
