"""Pure parts of serving: routing and its sticky split, request checks, stream parsing,
the vLLM command line, and the settings that feed it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from tuneloop.runtime.settings import ServingSettings, load_settings
from tuneloop.serving.gateway.answers import ResponseCache, Served
from tuneloop.serving.gateway.protocol import (
    BadRequest,
    check_chat,
    check_completion,
    completion_text,
    completion_tokens,
    error_response,
    parse_body,
    stream_answer,
)
from tuneloop.serving.routing import Route, RoutingTable, bucket, upstream_name
from tuneloop.serving.upstream import UpstreamError, error_message
from tuneloop.serving.vllm_process import cpu_share, replica_specs, vllm_argv, vllm_env


def test_production_answers_everyone_without_a_candidate() -> None:
    route = Route("support-bot", "v3")
    assert {route.choose(f"user-{i}") for i in range(100)} == {"v3"}
    assert Route("support-bot", None).choose("anyone") is None  # the base model


def test_canary_share_is_sticky_and_close_to_the_share() -> None:
    route = Route("support-bot", "v3", "v4", canary_share=0.2)
    picks = [route.choose(f"user-{i}") for i in range(5000)]
    assert picks == [route.choose(f"user-{i}") for i in range(5000)]
    share = picks.count("v4") / len(picks)
    assert 0.18 < share < 0.22
    # A new candidate draws a fresh sample of users, not the same unlucky ones.
    other = Route("support-bot", "v3", "v5", canary_share=0.2)
    again = {i for i in range(5000) if other.choose(f"user-{i}") == "v5"}
    first = {i for i, p in enumerate(picks) if p == "v4"}
    assert len(first & again) < 0.5 * len(first)


def test_shadow_samples_requests_only_with_a_candidate() -> None:
    assert not Route("a", "v1", None, shadow_share=1.0).shadow("r1")
    route = Route("a", "v1", "v2", shadow_share=0.25)
    share = sum(route.shadow(f"r{i}") for i in range(4000)) / 4000
    assert 0.22 < share < 0.28


@pytest.mark.parametrize("kwargs", [{"canary_share": 1.5}, {"shadow_share": -0.1},
                                    {"candidate": "v1"}])
def test_route_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Route("a", "v1", **kwargs)  # type: ignore[arg-type]


def test_routing_table_is_replaced_not_mutated() -> None:
    table = RoutingTable().with_route(Route("a", "v1", "v2"))
    new = table.with_route(Route("a", "v3"))
    assert table.get("a") == Route("a", "v1", "v2")
    assert new.versions() == {("a", "v3")}
    assert upstream_name("a", "v3", "base") == "a-v3" and upstream_name("a", None, "base") == "base"
    assert 0 <= bucket("x") < 1 and bucket("x") == bucket("x")


def test_request_checks_name_the_bad_field() -> None:
    with pytest.raises(BadRequest, match="model"):
        parse_body(b'{"messages": []}')
    with pytest.raises(BadRequest, match="JSON"):
        parse_body(b"{oops")
    with pytest.raises(BadRequest, match="messages"):
        check_chat({"model": "a", "messages": []})
    with pytest.raises(BadRequest, match="prompt"):
        check_completion({"model": "a", "prompt": ["one", "two"]})
    turns = check_chat({"messages": [{"role": "developer", "content": "be brief"},
                                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert turns == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert check_completion({"prompt": ["hello"]}) == [{"role": "user", "content": "hello"}]


def test_errors_use_openai_format() -> None:
    resp = error_response(404, "no such alias", param="model", code="model_not_found")
    body = json.loads(bytes(resp.body))
    assert resp.status_code == 404
    assert body == {"error": {"message": "no such alias", "type": "invalid_request_error",
                              "param": "model", "code": "model_not_found"}}
    assert json.loads(bytes(error_response(503, "down").body))["error"]["type"] == "server_error"
    assert error_message(b'{"error": {"message": "rank 32 > 16"}}') == "rank 32 > 16"
    assert error_message(b"plain") == "plain"
    assert UpstreamError("u", 404, "x").client_error
    assert not UpstreamError("u", 500, "x").client_error
    assert UpstreamError("u", 0, "refused").retriable


def test_stream_and_plain_answers_give_their_text() -> None:
    chunks = [{"id": "c1", "choices": [{"index": 0, "delta": {"content": piece}}]}
              for piece in ("card", "_arrival")]
    raw = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
    assert stream_answer(raw, chat=True)[:2] == ("card_arrival", "c1")
    text = {"id": "c2", "choices": [{"index": 0, "text": "hello"}]}
    assert stream_answer(f"data: {json.dumps(text)}\n\n".encode(), chat=False)[:2] == (
        "hello", "c2")
    assert completion_text({"choices": [{"message": {"content": "x"}}]}, chat=True) == "x"
    assert completion_text({"choices": [{"text": "y"}]}, chat=False) == "y"


def test_an_answers_output_tokens_come_from_its_usage_or_its_chunks() -> None:
    assert completion_tokens({"usage": {"completion_tokens": 7}}) == 7
    assert completion_tokens({"choices": []}) is None
    pieces = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}] + [
        {"choices": [{"index": 0, "delta": {"content": p}}], "usage": None} for p in "abc"]
    raw = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in pieces)
    assert stream_answer(raw + b"data: [DONE]\n\n", chat=True).tokens == 3  # the chunks that carried text
    usage = {"choices": [], "usage": {"completion_tokens": 4}}
    assert stream_answer(raw + f"data: {json.dumps(usage)}\n\n".encode(), chat=True).tokens == 4
    assert stream_answer(b"data: [DONE]\n\n", chat=True).tokens is None
    # continuous_usage_stats: every chunk carries the count so far; the last one counts.
    running = [{"choices": [{"index": 0, "delta": {"content": p}}],
                "usage": {"completion_tokens": i + 1}} for i, p in enumerate("abcde")]
    streamed = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in running)
    assert stream_answer(streamed, chat=True).tokens == 5
    assert completion_tokens({"usage": "n/a"}) is None and completion_tokens({"usage": {
        "completion_tokens": True}}) is None


def test_response_cache_keeps_the_latest() -> None:
    cache = ResponseCache(capacity=100, max_bytes=2**20)
    for i in range(150):
        cache.put(Served(f"r{i}", "a", None, True, [], None, {}))
    assert cache.get("r0") is None and cache.get("r149") is not None


def test_vllm_command_line_is_loopback_with_runtime_lora() -> None:
    cfg = ServingSettings(max_lora_rank=32, max_loras=3, max_cpu_loras=6)
    argv = vllm_argv(Path("/venv/bin/python"), "/models/smol", "smol", 8101, cfg)
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = {flag: argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag.startswith("--")}
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "8101"
    assert flags["--max-lora-rank"] == "32" and flags["--max-cpu-loras"] == "6"
    assert "--enable-lora" in argv
    assert not any("inplace" in a for a in argv)
    assert vllm_env(cfg)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_serving_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="max_cpu_loras"):
        ServingSettings(max_loras=4, max_cpu_loras=2)
    with pytest.raises(ValidationError):
        ServingSettings(canary_share=2)
    cfg = load_settings({"serving.replicas": 3, "serving.vllm_port": 9000}).serving
    assert cfg.upstream_urls() == [f"http://127.0.0.1:{p}" for p in (9000, 9001, 9002)]
    external = ServingSettings(replica_urls=["http://gpu-1:8000/"])
    assert external.upstream_urls() == ["http://gpu-1:8000"]


def test_replicas_get_their_own_cores() -> None:
    assert [cpu_share(i, 2, 2) for i in range(2)] == ["0", "1"]
    assert [cpu_share(i, 2, 16) for i in range(2)] == ["0-7", "8-15"]
    assert [cpu_share(i, 3, 2) for i in range(3)] == ["0", "1", "0"]


def test_a_replica_and_every_process_of_it_are_bound_to_its_cores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's threads (VLLM_CPU_OMP_THREADS_BIND) and the replica's own processes
    (its spinning engine core among them) share the replica's cores."""
    one = load_settings({"home": tmp_path, "serving.engine_cores": "0",
                         "serving.vllm_python": sys.executable})
    (spec,) = replica_specs(one, "model", "base")
    assert spec.cores == "0" and dict(spec.env)["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    two = load_settings({"home": tmp_path, "serving.replicas": 2,
                         "serving.vllm_python": sys.executable})
    cores = os.cpu_count() or 1
    assert [s.cores for s in replica_specs(two, "model", "base")] == [
        cpu_share(i, 2, cores) for i in range(2)]
    monkeypatch.delenv("TUNELOOP_SERVING__ENGINE_CORES", raising=False)
    free = load_settings({"home": tmp_path, "serving.vllm_python": sys.executable})
    (unbound,) = replica_specs(free, "model", "base")
    assert unbound.cores is None and "VLLM_CPU_OMP_THREADS_BIND" not in dict(unbound.env)


def test_events_from_an_answer_have_stable_ids_and_no_raw_user() -> None:
    from tuneloop.services.ingest.shadow import ShadowPair
    from tuneloop.serving.gateway.answers import feedback_event, shadow_pair
    from tuneloop.serving.gateway.protocol import FeedbackRequest

    served = Served("resp-1", "support-bot", "v3", True,
                    [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}],
                    "agent-7", {}, completion="card_arrival", latency_s=0.25)
    verdict = FeedbackRequest(response_id="resp-1", token="t", rating=-1, label="card_arrival")
    key = b"k" * 32
    first = feedback_event(served, "gateway.feedback", verdict, user_key=key)
    assert first.event_id == feedback_event(served, "gateway.feedback", verdict,
                                            user_key=key).event_id
    assert first.event_id != feedback_event(served, "gateway.served", user_key=key).event_id
    assert first.user_id and "agent-7" not in first.user_id
    assert first.rating == -1 and first.metadata["latency_ms"] == 250.0
    pair = ShadowPair.model_validate(shadow_pair(served, "v4", None, 500, 0.1))
    assert pair.production_version == "v3" and pair.candidate_completion is None
    assert str(pair.pair_id) == shadow_pair(served, "v4", "x", 200, 0.2)["pair_id"]


def test_user_ids_are_a_keyed_hash_and_server_fields_win_over_the_clients() -> None:
    """An unsalted hash of an e-mail address is found by hashing guesses; a keyed one is
    not without the key. A client's metadata cannot claim to be the gateway's answer."""
    import hashlib

    from tuneloop.serving.gateway.answers import feedback_event
    from tuneloop.serving.gateway.protocol import FeedbackRequest

    served = Served("resp-1", "support-bot", "v3", True, [{"role": "user", "content": "hi"}],
                    "jane@example.com", {}, completion="card_arrival", latency_s=0.25)
    verdict = FeedbackRequest(response_id="resp-1", token="t", rating=1, metadata={
        "source": "gateway.served", "latency_ms": 1, "ticket": "T-1"})
    one = feedback_event(served, "gateway.feedback", verdict, user_key=b"a" * 32)
    other = feedback_event(served, "gateway.feedback", verdict, user_key=b"b" * 32)
    guess = hashlib.sha256(b"jane@example.com").hexdigest()[:32]
    assert one.user_id != guess and one.user_id != other.user_id
    assert one.user_id == feedback_event(served, "gateway.served", user_key=b"a" * 32).user_id
    assert one.metadata == {"source": "gateway.feedback", "latency_ms": 250.0, "ticket": "T-1"}


def test_the_user_id_key_is_made_once_and_kept_private(tmp_path: Path) -> None:
    from tuneloop.runtime.settings import load_settings
    from tuneloop.serving.control import user_id_key

    settings = load_settings({"home": tmp_path})
    key = user_id_key(settings)
    assert len(key) >= 32 and user_id_key(settings) == key
    assert (tmp_path / "user-id.key").stat().st_mode & 0o777 == 0o600
    assert user_id_key(load_settings({"home": tmp_path, "serving.user_id_key": "s3cret"})) == b"s3cret"


def test_reconciling_leaves_versions_that_cannot_load_aside() -> None:
    from tuneloop.serving.gateway.reconcile import differs
    from tuneloop.serving.routing import Route

    route = Route("support-bot", "v3", None)
    assert not differs(route, "v3", None, set())
    assert differs(route, "v4", None, set())  # the registry moved on
    assert differs(route, "v3", "v5", set())  # a canary the gateway lost
    assert not differs(route, "v3", "v5", {"v5"})  # routed around: it cannot load
    assert not differs(Route("support-bot", "v2", None), "v3", None, {"v3"})  # fell back


def test_reconciling_never_undoes_a_swap_that_landed_while_the_registry_was_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A promotion swaps the gateway first and records in the registry after: a reconcile
    round that read the registry just before that record must not take the new route
    back, and a swap decided on a route read earlier is refused once the route changed."""
    import asyncio
    import time

    from tuneloop.serving.control import RegistryRoute
    from tuneloop.serving.gateway import reconcile
    from tuneloop.serving.pool import ReplicaPool, SwapError

    settings = load_settings({"home": tmp_path, "serving.reconcile_s": 1})
    alias = settings.serving.alias
    pool = ReplicaPool([], base_name="base", adapters_dir=tmp_path, lookup=lambda *a: None,
                       start_timeout_s=1, health_interval_s=1, rollback_grace_s=1)
    promoted = Route(alias, None, shadow_share=0.5)  # what the promotion's swap sets

    def registry_read_during_a_swap(_settings: object, _alias: str) -> RegistryRoute:
        pool.routing = pool.routing.with_route(promoted)  # the swap lands meanwhile
        pool.last_swap_at[alias] = time.monotonic()
        return RegistryRoute(production="v1", canary=None)  # not recorded yet

    monkeypatch.setattr(reconcile, "registry_route", registry_read_during_a_swap)

    swaps: list[Route] = []

    async def recorded(route: Route, expect: Route | None = None) -> None:
        swaps.append(route)

    async def run() -> None:
        monkeypatch.setattr(pool, "set_route", recorded)
        assert await reconcile.reconcile_once(settings, pool, lambda _r: None) is None
        assert swaps == [] and pool.routing.get(alias) == promoted
        monkeypatch.undo()
        # A change decided on the route as it was is refused now that it changed.
        with pytest.raises(SwapError, match="changed meanwhile"):
            await pool.set_route(Route(alias, None), expect=Route(alias, None))
        assert pool.routing.get(alias) == promoted
        await pool.set_route(Route(alias, None), expect=promoted)
        assert pool.routing.get(alias) == Route(alias, None)

    asyncio.run(run())


def test_the_response_store_keeps_answers_across_a_restart_within_its_bounds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneloop.serving.gateway import responses
    from tuneloop.serving.gateway.responses import ResponseStore

    path = tmp_path / "responses.sqlite"
    store = ResponseStore(path, max_answers=1000, max_bytes=10**9)
    served = Served("resp-1", "support-bot", "v3", True, [{"role": "user", "content": "hi"}],
                    "agent-7", {"model": "support-bot"}, completion="card_arrival")
    store.put(served, "cmpl-9", shadow_candidate="v4")
    store.close()
    again = ResponseStore(path, max_answers=1000, max_bytes=10**9)  # a new gateway
    for key in ("resp-1", "cmpl-9"):
        kept = again.get(key)
        assert kept is not None and kept.completion == "card_arrival" and kept.user == "agent-7"
        assert kept.occurred_at == served.occurred_at
    assert [(s.response_id, c) for s, c in again.pending_shadows()] == [("resp-1", "v4")]
    again.shadow_done("resp-1")
    assert again.pending_shadows() == []
    assert path.stat().st_mode & 0o777 == 0o600
    again.close()

    monkeypatch.setattr(responses, "_TRIM_EVERY", 1)  # trim on every answer
    small = ResponseStore(tmp_path / "small.sqlite", max_answers=3, max_bytes=10**9)
    for i in range(10):
        small.put(Served(f"r{i}", "a", None, True, [], None, {}), None, None)
    assert [small.get(f"r{i}") is not None for i in range(10)] == [False] * 7 + [True] * 3
    small.close()
    one_kb = "x" * 1000
    tight = ResponseStore(tmp_path / "tight.sqlite", max_answers=1000, max_bytes=3500)
    for i in range(6):
        tight.put(Served(f"b{i}", "a", None, True, [], None, {}, completion=one_kb), None, None)
    assert [tight.get(f"b{i}") is not None for i in range(6)] == [False] * 4 + [True] * 2
    tight.close()


def test_previous_productions_are_read_newest_first(tmp_path: Path) -> None:
    from tuneloop.runtime.settings import load_settings
    from tuneloop.services.store.database import Store
    from tuneloop.serving.control import previous_productions

    settings = load_settings({"home": tmp_path})
    with Store.of(settings).connect() as con:
        for version, at in (("v1", "2026-01-01"), ("v2", "2026-01-02"), ("v1", "2026-01-03")):
            con.execute("INSERT INTO deployments VALUES (?, ?, ?, 'candidate', 'production', "
                        "'promote', 'test')", [f"d-{version}-{at}", at, version])
        for version in ("v1", "v2"):
            con.execute("INSERT INTO adapters (version, name, alias, created_at, base_model, "
                        "base_hash, path, sha256, metrics, state) VALUES (?, ?, 'support-bot', "
                        "now(), 'b', 'h', ?, 's', '{}', 'retired')",
                        [version, f"support-bot-{version}", version])
    assert previous_productions(settings, "support-bot") == ["v1", "v2"]


def test_a_replica_that_keeps_dying_soon_after_starting_is_restarted_with_backoff() -> None:
    from tuneloop.serving.pool import restart_due

    # Died 5 s after its start: restarted at once, the first quick death.
    assert restart_due(0, 5.0) == (True, 1)
    # Dead again 1 s after that restart: it waits until 2 s have passed since the start.
    assert restart_due(1, 1.0) == (False, 1)
    assert restart_due(1, 2.5) == (True, 2)
    # The wait doubles with each quick death and stops growing at 60 s.
    waits = []
    for deaths in range(1, 10):
        waits.append(next(t for t in range(0, 100) if restart_due(deaths, float(t))[0]))
    assert waits == [3, 5, 9, 17, 33, 61, 61, 61, 61]
    # One that served for longer than ten minutes is restarted at once, the count reset.
    assert restart_due(7, 700.0) == (True, 0)


def test_a_replica_that_answers_is_not_started_twice_when_its_process_is_not_found(
        tmp_path: Path) -> None:
    """A vLLM whose pid file no longer matches it (its start on the wall clock moved) but
    that still answers on its port: a second one started there could not bind the port
    and would die, each try taking the replica out of rotation. It serves on; one that
    neither runs nor answers is restarted."""
    import asyncio

    from tuneloop.runtime.processes import ManagedProcess
    from tuneloop.serving.pool import Replica, ReplicaPool
    from tuneloop.serving.vllm_process import ReplicaSpec

    class Answers:
        url = "http://127.0.0.1:1"
        up = True

        async def healthy(self) -> bool:
            return self.up

        async def models(self) -> dict[str, str | None]:
            return {}

    starts: list[int] = []

    class NotFound(ReplicaSpec):
        def alive(self) -> bool:
            return False

        def start(self) -> int:
            starts.append(self.index)
            return 0

    client = Answers()
    spec = NotFound(0, client.url, (), (), ManagedProcess("vllm-0", tmp_path))
    replica = Replica(0, client, spec, state="ready")  # type: ignore[arg-type]
    pool = ReplicaPool([replica], base_name="base", adapters_dir=tmp_path,
                       lookup=lambda *a: None, start_timeout_s=1, health_interval_s=1,
                       rollback_grace_s=1)  # type: ignore[arg-type]

    async def run() -> None:
        for _ in range(3):
            await pool._check(replica)
        assert starts == [] and replica.state == "ready" and replica.unowned
        client.up = False  # one missed health check: looked at again, not restarted
        await pool._check(replica)
        assert starts == [] and replica.unowned
        for _ in range(2):  # gone for real
            await pool._check(replica)
        assert starts == [0] and replica.state == "starting" and not replica.unowned
        # A replica whose process is gone and whose port is silent restarts at once.
        replica.state, replica.started_at = "ready", 0.0
        await pool._check(replica)
        assert starts == [0, 0]

    asyncio.run(run())


def test_a_slow_gateway_is_running_and_an_unreachable_one_is_not(tmp_path: Path) -> None:
    """A promotion swaps the gateway's route only when a gateway runs: one that answers
    late (3 s here, a loaded machine) is running; taken for absent, the promotion would
    be recorded and routed only by the gateway's reconcile, at the gateway's own shares."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tuneloop.runtime.processes import free_port
    from tuneloop.serving.control import GatewayAdmin

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            time.sleep(3)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        slow = load_settings({"home": tmp_path, "serving.gateway_port": server.server_port})
        assert GatewayAdmin(slow).running()
    finally:
        server.shutdown()
        server.server_close()
    gone = load_settings({"home": tmp_path, "serving.gateway_port": free_port()})
    assert not GatewayAdmin(gone).running()
