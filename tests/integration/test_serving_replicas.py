"""Two vLLM replicas behind one gateway: a swap reaches both before the flip, requests
are balanced across them, and a dead replica's traffic goes to the other without a
failed request while it restarts and reloads the production adapter."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ServingStack
from tuneloop.infra.gateway import EmbeddedGateway
from tuneloop.runtime.processes import ManagedProcess, free_port
from tuneloop.runtime.settings import load_settings
from tuneloop.serving.control import GatewayAdmin, promote

pytestmark = pytest.mark.integration

CHAT = [{"role": "user", "content": "How do I top up my card?"}]


@pytest.fixture(scope="module")
def two_replicas(serving_stack: ServingStack, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[ServingStack]:
    home = tmp_path_factory.mktemp("replicas")  # the base model is converted once a machine
    ports = {"TUNELOOP_SERVING__GATEWAY_PORT": str(free_port()),
             "TUNELOOP_SERVING__VLLM_PORT": str(free_port())}
    env = {**serving_stack.env, "TUNELOOP_HOME": str(home), **ports,
           "TUNELOOP_SERVING__REPLICAS": "2"}
    # Replica 1 listens on vllm_port + 1: make sure that one is free too.
    while not _free(int(ports["TUNELOOP_SERVING__VLLM_PORT"]) + 1):
        ports["TUNELOOP_SERVING__VLLM_PORT"] = env["TUNELOOP_SERVING__VLLM_PORT"] = str(free_port())
    settings = load_settings({"home": home, "serving.replicas": 2, "serving.admin_key": "test-admin-key",
                              "serving.gateway_port": int(env["TUNELOOP_SERVING__GATEWAY_PORT"]),
                              "serving.vllm_port": int(env["TUNELOOP_SERVING__VLLM_PORT"])})
    gateway = EmbeddedGateway(settings)
    try:
        gateway.start(env, timeout_s=600)
        # Both replicas up, not only the first.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            states = [r["state"] for r in GatewayAdmin(settings).state()["replicas"]]
            if states == ["ready", "ready"]:
                break
            time.sleep(1)
        yield ServingStack(settings, serving_stack.base_path, serving_stack.base_name, env)
    finally:
        gateway.stop()


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _replica_requests(stack: ServingStack) -> dict[str, float]:
    text = httpx.get(f"{stack.url}/metrics").text
    return {m[0]: float(m[1]) for m in
            re.findall(r'tuneloop_gateway_replica_requests_total\{replica="(\d)"\} ([0-9.]+)', text)}


def test_swap_reaches_every_replica_and_traffic_is_balanced(two_replicas: ServingStack) -> None:
    stack = two_replicas
    version = stack.publish()
    promote(stack.settings, version, "production", "two replicas")
    replicas = GatewayAdmin(stack.settings).state()["replicas"]
    assert [r["state"] for r in replicas] == ["ready", "ready"]
    assert all(f"support-bot-{version}" in r["loaded"] for r in replicas)

    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0, timeout=120)
    before = _replica_requests(stack)
    threads = [threading.Thread(target=lambda: client.chat.completions.create(
        model="support-bot", messages=CHAT, max_tokens=4)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = _replica_requests(stack)
    assert all(after.get(r, 0) > before.get(r, 0) for r in ("0", "1")), (before, after)


def test_a_dead_replica_costs_no_request(two_replicas: ServingStack) -> None:
    stack = two_replicas
    version = GatewayAdmin(stack.settings).state()["routes"][0]["production"]
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0, timeout=120)
    failures: list[str] = []
    served: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model="support-bot", messages=CHAT, max_tokens=4)
                served.append(raw.headers["x-tuneloop-adapter-version"])
            except openai.OpenAIError as exc:
                failures.append(repr(exc))

    pid = ManagedProcess("vllm-1", Path(stack.settings.home)).pid()
    assert pid is not None
    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        os.killpg(pid, signal.SIGKILL)
        time.sleep(10)  # the other replica carries the traffic meanwhile
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    # A request cut off by the kill is sent again to the other replica, before any byte
    # reached the client: none fails.
    assert failures == []
    assert served and set(served) == {version}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        replica = GatewayAdmin(stack.settings).state()["replicas"][1]
        if replica["restarts"] >= 1 and replica["state"] == "ready":
            break
        time.sleep(1)
    replica = GatewayAdmin(stack.settings).state()["replicas"][1]
    assert replica["state"] == "ready" and f"support-bot-{version}" in replica["loaded"]
