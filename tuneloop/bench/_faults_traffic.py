"""Processes killed while users ask: the retrain's worker, a vLLM replica, the gateway.

Users ask the alias through the official ``openai`` client throughout, retrying what the
gateway says is retriable; each fault returns the ``Outcome`` it cost, its requests,
retried attempts and failed requests among them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tuneloop.bench._faults_stack import Bench, Outcome, fault_events, in_threads
from tuneloop.infra.supervisor import read_state
from tuneloop.runtime.processes import ManagedProcess, wait_until
from tuneloop.services.demo import banking77

REQUEST_LIMIT_S = 60.0


@contextmanager
def _users(b: Bench, out: Outcome, workers: int = 3) -> Iterator[None]:
    """Users asking the alias, retrying what the gateway says is retriable."""
    import openai

    chat: Any = [m.model_dump() for m in banking77.chat("I still have not received my card")]

    def user(stop: threading.Event, _: int) -> None:
        client = openai.OpenAI(base_url=f"{b.settings.serving.gateway_url}/v1",
                               api_key="unused", max_retries=0, timeout=REQUEST_LIMIT_S)
        while not stop.is_set():
            out.requests += 1
            started = time.monotonic()
            while not stop.is_set():
                try:
                    client.chat.completions.create(model=b.settings.serving.alias,
                                                   messages=chat, max_tokens=8, temperature=0)
                    break
                except openai.APIStatusError as exc:  # retriable only with Retry-After
                    if exc.status_code != 503 or "retry-after" not in exc.response.headers:
                        out.failed += 1
                        out.failures.append(f"{exc.status_code}: {exc.message[:120]}")
                        break
                    out.retried += 1
                    time.sleep(min(5.0, float(exc.response.headers["retry-after"] or 1)))
                except openai.APITimeoutError:
                    out.failed += 1
                    out.failures.append(f"no answer in {REQUEST_LIMIT_S:.0f} s")
                    break
                except openai.APIConnectionError:  # nothing listening: the gateway is down
                    out.retried += 1
                    time.sleep(1.0)
                if time.monotonic() - started > 600:
                    out.failed += 1
                    out.failures.append("no answer after 600 s of retries")
                    break

    with in_threads(user, workers, REQUEST_LIMIT_S + 10):
        yield


def _answers(b: Bench) -> bool:
    import openai

    client = openai.OpenAI(base_url=f"{b.settings.serving.gateway_url}/v1", api_key="unused",
                           max_retries=0, timeout=REQUEST_LIMIT_S)
    try:
        client.chat.completions.create(model=b.settings.serving.alias, max_tokens=4,
                                       messages=[{"role": "user", "content": "hello"}])
    except openai.APIError:
        return False
    return True


def _serving_fault(b: Bench, name: str, kill: Callable[[], str],
                   back: Callable[[], bool]) -> Outcome:
    out = Outcome(name)
    with _users(b, out):
        time.sleep(5)
        what = kill()
        killed_at = time.monotonic()
        try:
            wait_until(back, 600, name, interval_s=1.0)
            resumed = time.monotonic() - killed_at
        except TimeoutError:
            resumed = float("nan")
            out.recovered = False
        time.sleep(5)  # users keep asking after it is back
    out.detail = f"{what}; serving again after {resumed:.0f} s"
    return out


def vllm_kill(b: Bench) -> Outcome:
    """SIGKILL vLLM replica 0 while users ask; the gateway must restart it."""
    from tuneloop.serving.control import GatewayAdmin

    admin = GatewayAdmin(b.settings)
    restarts = admin.state()["replicas"][0]["restarts"]

    def kill() -> str:
        pid = ManagedProcess("vllm-0", b.home).pid()
        assert pid is not None, "vLLM replica 0 is not running"
        os.killpg(pid, signal.SIGKILL)
        return f"killed vLLM replica 0 (pid {pid})"

    def back() -> bool:
        replica = admin.state()["replicas"][0]
        return bool(replica["state"] == "ready" and replica["restarts"] > restarts
                    and _answers(b))

    return _serving_fault(b, "vLLM replica SIGKILL during traffic", kill, back)


def gateway_kill(b: Bench) -> Outcome:
    """SIGKILL the gateway while users ask; its supervisor must restart it."""
    supervisor = ManagedProcess("gateway", b.home).pid()
    state = read_state(b.home, "gateway") or {}
    child = state.get("child_pid")
    vllm = ManagedProcess("vllm-0", b.home).pid()

    def kill() -> str:
        if child is None:  # not supervised: kill what there is
            os.kill(int(supervisor or 0), signal.SIGKILL)
            return f"killed the gateway (pid {supervisor}, not supervised)"
        os.kill(int(child), signal.SIGKILL)
        return f"killed the gateway (pid {child})"

    def back() -> bool:
        return _answers(b)

    out = _serving_fault(b, "gateway SIGKILL during traffic", kill, back)
    adopted = ManagedProcess("vllm-0", b.home).pid() == vllm
    out.detail += ("; the new gateway adopted the running vLLM" if adopted
                   else "; vLLM was restarted")
    return out


RETRAIN_RECIPE = ("rank: 8\nalpha: 16\nmax_steps: 12\nbatch_size: 4\neval_interval: 2\n"
                  "patience: 100\neval_max_examples: 8\ngeneration_max_new_tokens: 6\n"
                  "task_eval_max_examples: 8\n")


def worker_kill(b: Bench, n: int) -> Outcome:
    """SIGKILL the deployment worker after the first checkpoint of a retrain it runs on
    ``n`` fresh labelled events, with users asking meanwhile."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tuneloop.services.registry.store import list_adapters

    out = Outcome("worker SIGKILL during a retrain")
    events = fault_events(n, seed=17)
    ids = {str(e.event_id) for e in events}
    dead_before = b.dead_letters()
    b.send_raw([e.to_json_bytes() for e in events])
    out.sent = n
    b.caught_up(300)
    recipe = b.home / "fault-retrain.yaml"
    recipe.write_text(RETRAIN_RECIPE)
    key = f"fault-worker-kill-{uuid.uuid4().hex[:8]}"

    def deployed() -> bool:
        with get_client(sync_client=True) as client:
            try:
                client.read_deployment_by_name("retrain/loop")
            except Exception:  # noqa: BLE001 - not registered yet
                return False
        return True

    def published() -> list[Any]:
        with b.store.connect() as con:
            return [a for a in list_adapters(con) if a.run_key == key]

    with temporary_settings(updates={PREFECT_API_URL: b.settings.prefect.api_url}):
        return _worker_kill(b, out, key, recipe, ids, dead_before, deployed, published)


def _worker_kill(b: Bench, out: Outcome, key: str, recipe: Path, ids: set[str],
                 dead_before: int, deployed: Callable[[], bool],
                 published: Callable[[], list[Any]]) -> Outcome:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.deployments import run_deployment

    wait_until(deployed, 180, "the worker's deployments", interval_s=1.0)
    checkpoint = b.settings.runs_dir / key / "checkpoint" / "state.json"
    restarts = int((read_state(b.home, "worker") or {}).get("restarts", 0))
    first = run_deployment("retrain/loop", timeout=0, parameters={
        "reason": "bench faults: worker kill", "config_file": str(recipe), "run_key": key})
    assert not asyncio.iscoroutine(first)
    started = time.monotonic()
    with _users(b, out):
        wait_until(checkpoint.exists, 900, "the retrain's first checkpoint", interval_s=0.2)
        step = json.loads(checkpoint.read_text())["step"]
        child = (read_state(b.home, "worker") or {}).get("child_pid")
        os.kill(int(child or 0), signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            wait_until(lambda: bool(published()), 1200, "the resumed retrain", interval_s=2.0)
        except TimeoutError:
            out.recovered = False
    adapters = published()
    with get_client(sync_client=True) as client:
        crashed = client.read_flow_run(first.id)
        resumed = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=["resumed"]))) if r.parameters.get("run_key") == key]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not all(r.state and r.state.is_final()
                                                       for r in resumed):
            time.sleep(1)
            resumed = [client.read_flow_run(r.id) for r in resumed]
    b.count(out, ids, dead_before)
    worker_restarts = int((read_state(b.home, "worker") or {}).get("restarts", 0)) - restarts
    from_step = adapters[0].metrics["training"]["resumed_from_step"] if adapters else 0
    out.recovered = bool(out.recovered and len(adapters) == 1 and worker_restarts >= 1
                         and crashed.state and crashed.state.is_crashed() and len(resumed) == 1
                         and resumed[0].state and resumed[0].state.is_completed()
                         and from_step > 0)
    out.detail = (f"killed worker pid {child} at checkpoint step {step}; {worker_restarts} "
                  f"restart; the run {crashed.state.name if crashed.state else '?'}, "
                  f"{len(resumed)} resumed run(s) "
                  f"{', '.join(str(r.state.name) for r in resumed if r.state)}, training went on "
                  f"from step {from_step}; {len(adapters)} adapter(s) under the run key "
                  f"({', '.join(str(a.version) for a in adapters)}); published "
                  f"{time.monotonic() - killed_at:.0f} s after the kill, "
                  f"{time.monotonic() - started:.0f} s after the retrain started")
    return out
