"""The gateway's HTTP surface without vLLM: every route's status codes and error bodies.

The app is the real one (``create_app``) with no replica behind it and no Kafka; its
lifespan does not run, so nothing is started. An admin call that needs a replica
answers as it does while vLLM is down: 503 with ``Retry-After``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tuneloop.runtime.settings import load_settings
from tuneloop.serving.gateway.app import create_app
from tuneloop.serving.routing import Route, RoutingTable

KEY = "unit-admin-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "where is my card?"}]


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    settings = load_settings({"home": tmp_path, "serving.admin_key": KEY,
                              "serving.replica_urls": ["http://127.0.0.1:9"]})
    app = create_app(settings, "unused-model-path", "base-model", kafka=False)
    app.state.gateway.pool.routing = RoutingTable().with_route(Route("support-bot", "v1"))
    return TestClient(app)


def _error(resp: object) -> dict[str, object]:
    body = json.loads(resp.content)  # type: ignore[attr-defined]
    return dict(body["error"])


def test_public_routes_answer_without_a_replica(client: TestClient) -> None:
    health = client.get("/health")
    assert health.status_code == 503 and health.json() == {"status": "unavailable"}
    models = client.get("/v1/models").json()
    assert [(m["id"], m["production"], m["candidate"]) for m in models["data"]] == [
        ("support-bot", "v1", None)]
    assert "tuneloop_gateway_requests" in client.get("/metrics").text


def test_bad_requests_get_openai_errors(client: TestClient) -> None:
    garbage = client.post("/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert garbage.status_code == 400 and _error(garbage)["type"] == "invalid_request_error"
    unknown = client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert unknown.status_code == 404 and _error(unknown)["code"] == "model_not_found"
    empty = client.post("/v1/chat/completions", json={"model": "support-bot", "messages": []})
    assert empty.status_code == 400 and _error(empty)["param"] == "messages"


def test_feedback_is_checked_before_it_is_sent(client: TestClient) -> None:
    no_verdict = client.post("/v1/feedback", json={"response_id": "resp-1", "token": "t"})
    assert no_verdict.status_code == 400 and "at least one" in str(_error(no_verdict)["message"])
    no_token = client.post("/v1/feedback", json={"response_id": "resp-1", "rating": 1})
    assert no_token.status_code == 400 and _error(no_token)["param"] == "token"
    unknown = client.post("/v1/feedback", json={"response_id": "resp-1", "token": "t",
                                                "rating": 1})
    assert unknown.status_code == 404 and _error(unknown)["code"] == "response_not_found"
    extra = client.post("/v1/feedback", json={"response_id": "r", "token": "t", "rating": 1,
                                              "stars": 5})
    assert extra.status_code == 400 and _error(extra)["param"] == "stars"
    out_of_range = client.post("/v1/feedback", json={"response_id": "r", "token": "t",
                                                     "rating": 3})
    assert out_of_range.status_code == 400 and _error(out_of_range)["param"] == "rating"


def test_only_the_user_who_got_an_answer_rates_it_and_not_without_end(tmp_path: Path) -> None:
    """A verdict needs the answer's feedback token (so a response id alone rates nothing),
    and one user's verdicts are rate-limited."""
    from tuneloop.services.feedback.signing import feedback_token
    from tuneloop.serving.gateway.answers import Served

    settings = load_settings({"home": tmp_path, "serving.admin_key": KEY,
                              "serving.replica_urls": ["http://127.0.0.1:9"],
                              "serving.feedback_per_minute": 3})
    app = create_app(settings, "unused", "base-model", kafka=False)
    gateway = app.state.gateway
    for i in range(5):
        gateway.cache.put(Served(f"resp-{i}", "support-bot", "v1", True,
                                 [{"role": "user", "content": "q"}], "alice", {}, completion="a"))
    client = TestClient(app)

    def post(i: int, token: str) -> int:
        return client.post("/v1/feedback", json={"response_id": f"resp-{i}", "token": token,
                                                 "rating": -1}).status_code

    assert post(0, feedback_token(gateway.event_key, "resp-0", "mallory")) == 403
    assert post(0, feedback_token(gateway.event_key, "resp-1", "alice")) == 403
    # The right token passes the checks (and this gateway has no Kafka: 503).
    assert [post(i, feedback_token(gateway.event_key, f"resp-{i}", "alice"))
            for i in range(5)] == [503, 503, 503, 429, 429]


def test_admin_routes_need_the_key(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": ""}):
        resp = client.get("/admin/state", headers=headers)
        assert resp.status_code == 401 and _error(resp)["type"] == "authentication_error"
    assert client.post("/admin/route", json={}).status_code == 401
    assert client.post("/admin/v1/chat/completions", json={}).status_code == 401
    state = client.get("/admin/state", headers={"x-api-key": KEY})
    assert state.status_code == 200
    assert state.json()["routes"][0]["production_name"] == "support-bot-v1"
    assert state.json()["base_model"] == "base-model"


def test_admin_route_changes_the_routing_and_keeps_the_shares(
        client: TestClient, tmp_path: Path) -> None:
    same = client.post("/admin/route", json={"candidate": "v1"}, headers=ADMIN)
    assert same.status_code == 400 and "production and candidate" in str(_error(same)["message"])
    share = client.post("/admin/route", json={"production": None, "shadow_share": 0.5},
                        headers=ADMIN)
    assert share.status_code == 200, share.text
    assert share.json()["route"] == {
        "alias": "support-bot", "production": None, "candidate": None, "canary_share": 0.0,
        "shadow_share": 0.5, "production_name": "base"}
    assert "total_s" in share.json()["timings"]
    saved = json.loads((tmp_path / "serving" / "routing.json").read_text())
    assert saved["shadow_share"] == 0.5
    bad = client.post("/admin/route", json={"canary_share": 2}, headers=ADMIN)
    assert bad.status_code == 400 and _error(bad)["param"] == "canary_share"


def test_admin_load_unload_and_observations(client: TestClient) -> None:
    no_replica = client.post("/admin/load", json={"version": "v2"}, headers=ADMIN)
    assert no_replica.status_code == 503 and no_replica.headers["retry-after"] == "5"
    assert client.post("/admin/load", json={"version": "2"}, headers=ADMIN).status_code == 400
    routed = client.post("/admin/unload", json={"version": "v1"}, headers=ADMIN)
    assert routed.status_code == 422 and _error(routed)["code"] == "swap_failed"
    assert 'tuneloop_gateway_swaps_total{alias="support-bot",result="failed"} 1.0' in \
        client.get("/metrics").text
    bad = client.get("/admin/observations?since=yesterday", headers=ADMIN)
    assert bad.status_code == 400 and _error(bad)["param"] == "since"
    seen = client.get("/admin/observations?since=0&until=5", headers=ADMIN).json()
    assert seen == {"alias": "support-bot", "since": 0.0, "until": 5.0, "versions": {}}


def test_the_internal_route_serves_only_loaded_versions(client: TestClient) -> None:
    resp = client.post("/admin/v1/chat/completions", headers=ADMIN,
                       json={"model": "support-bot-v9", "messages": CHAT})
    assert resp.status_code == 409 and _error(resp)["code"] == "not_loaded"


def test_cross_site_bodies_are_refused_and_cors_is_off_by_default(client: TestClient) -> None:
    """A page on another site can post text/plain from a user's browser without asking;
    the gateway reads JSON bodies only, and answers no CORS request unless configured."""
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/feedback"):
        plain = client.post(path, content=json.dumps({"model": "support-bot", "prompt": "x"}),
                            headers={"content-type": "text/plain"})
        assert plain.status_code == 415, path
        assert _error(plain)["code"] == "unsupported_media_type"
    preflight = client.options("/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_answers_the_configured_origins_only(tmp_path: Path) -> None:
    settings = load_settings({"home": tmp_path, "serving.admin_key": KEY,
                              "serving.replica_urls": ["http://127.0.0.1:9"],
                              "serving.cors_origins": ["https://app.example"]})
    client = TestClient(create_app(settings, "unused", "base-model", kafka=False))
    asked = {"Access-Control-Request-Method": "POST"}
    ok = client.options("/v1/feedback", headers={"Origin": "https://app.example", **asked})
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    other = client.options("/v1/feedback", headers={"Origin": "https://evil.example", **asked})
    assert "access-control-allow-origin" not in other.headers


def test_oversized_deep_and_greedy_requests_get_openai_errors(tmp_path: Path) -> None:
    settings = load_settings({"home": tmp_path, "serving.admin_key": KEY,
                              "serving.replica_urls": ["http://127.0.0.1:9"],
                              "serving.max_body_bytes": 4096, "serving.max_tokens": 256,
                              "serving.max_n": 2})
    app = create_app(settings, "unused", "base-model", kafka=False)
    app.state.gateway.pool.routing = RoutingTable().with_route(Route("support-bot", "v1"))
    client = TestClient(app)
    big = client.post("/v1/chat/completions", json={
        "model": "support-bot", "messages": [{"role": "user", "content": "x" * 5000}]})
    assert big.status_code == 413 and _error(big)["code"] == "request_too_large"
    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(10):
            yield b" " * 1000
    streamed = client.post("/v1/feedback", content=chunks(),
                           headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    for path in ("/v1/chat/completions", "/v1/feedback"):
        deep = client.post(path, content=b"[" * 2000 + b"]" * 2000,
                           headers={"content-type": "application/json"})
        assert deep.status_code == 400 and "nested deeper" in str(_error(deep)["message"]), path
    nested = {"model": "support-bot", "messages": CHAT, "metadata": {}}
    level = nested["metadata"]
    for _ in range(40):
        level["x"] = {}
        level = level["x"]
    assert client.post("/v1/chat/completions", json=nested).status_code == 400
    for field, value in (("max_tokens", 257), ("max_completion_tokens", 10**9), ("n", 3),
                         ("max_tokens", "12"), ("n", 0)):
        greedy = client.post("/v1/chat/completions", json={
            "model": "support-bot", "messages": CHAT, field: value})
        assert greedy.status_code == 400 and _error(greedy)["param"] == field, (field, value)


def test_the_response_cache_is_bounded_in_bytes() -> None:
    from tuneloop.serving.gateway.answers import ResponseCache, Served

    cache = ResponseCache(capacity=1000, max_bytes=10_000)
    for i in range(50):
        served = Served(f"resp-{i}", "support-bot", "v1", True, [], None, {}, nbytes=900,
                        completion="x" * 100)
        cache.put(served, f"cmpl-{i}")  # two keys, one answer
    assert cache.nbytes <= 10_000
    assert cache.get("resp-49") and cache.get("cmpl-49") and cache.get("resp-0") is None
    assert cache.nbytes == 1000 * len({id(cache.get(f"resp-{i}")) for i in range(50)
                                       if cache.get(f"resp-{i}")})


def test_a_json_alias_is_decoded_under_its_schema_through_the_gateway(tmp_path: Path) -> None:
    """What reaches vLLM: a user's chat on a json alias carries the schema as its
    response_format, so does the offline gate's (the internal route); a client's own
    format is forwarded as sent; a completion is not constrained. The upstream here is a
    stand-in that records each body and answers one object."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from tuneloop.serving.pool import Replica
    from tuneloop.serving.upstream import ReplicaClient

    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    settings = load_settings({"home": tmp_path, "serving.admin_key": KEY,
                              "serving.replica_urls": ["http://127.0.0.1:9"],
                              "tasks": {"support-bot": {
                                  "kind": "json", "json_schema": tmp_path / "schema.json",
                                  "system_prompt": "Answer with the booking object."}}})
    seen: list[dict[str, object]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(await request.json())
        message = {"role": "assistant", "content": '{"city": "Paris"}'}
        return web.json_response({"id": "u1", "object": "chat.completion", "model": "m",
                                  "choices": [{"index": 0, "message": message, "text": "x",
                                               "finish_reason": "stop"}]})

    async def scenario() -> list[int]:
        upstream = web.Application()
        upstream.router.add_post("/v1/chat/completions", answer)
        upstream.router.add_post("/v1/completions", answer)
        runner = web.AppRunner(upstream)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        app = create_app(settings, "unused-model-path", "base-model", kafka=False)
        gateway = app.state.gateway
        statuses = []
        async with aiohttp.ClientSession() as session:
            gateway.session = session
            gateway.pool.replicas.append(Replica(0, ReplicaClient(f"http://127.0.0.1:{port}",
                                                                  session), state="ready"))
            gateway.pool.routing = RoutingTable().with_route(Route("support-bot", None))
            own = {"type": "json_object"}
            for body, endpoint, internal in (
                    ({"model": "support-bot", "messages": CHAT}, "chat", False),
                    ({"model": "support-bot", "messages": CHAT, "response_format": own},
                     "chat", False),
                    ({"model": "support-bot", "prompt": "where is my card?"}, "completions",
                     False),
                    ({"model": "base-model", "messages": CHAT}, "chat", True)):
                raw = json.dumps(body).encode()
                resp = await (gateway.serve_internal(raw, endpoint) if internal else
                              gateway.serve(raw, endpoint, "127.0.0.1", None))
                statuses.append(resp.status_code)
        await runner.cleanup()
        return statuses

    assert asyncio.run(scenario()) == [200, 200, 200, 200]
    expected = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    assert [b.get("response_format") for b in seen] == [
        expected, {"type": "json_object"}, None, expected]
    assert seen[0]["messages"][0] == {  # type: ignore[index]
        "role": "system", "content": "Answer with the booking object."}


def test_a_connection_the_replica_closed_as_it_was_reused_costs_no_request(
        tmp_path: Path) -> None:
    """vLLM closes an idle keep-alive connection on its own clock; a request sent on it
    just then finds it gone. The stand-in upstream closes every connection as its second
    request arrives: each such request is sent again on a new connection, the replica
    stays in rotation, and every user gets an answer."""
    import asyncio

    import aiohttp

    from tuneloop.serving.pool import Replica
    from tuneloop.serving.upstream import ReplicaClient

    settings = load_settings({"home": tmp_path, "serving.admin_key": KEY,
                              "serving.replica_urls": ["http://127.0.0.1:9"]})
    body = json.dumps({"id": "u1", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "card_arrival"},
         "finish_reason": "stop"}]}).encode()
    dropped: list[int] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length")), 0)
            await reader.readexactly(length)
            if served == 1:  # the reused connection: gone before answering
                dropped.append(1)
                writer.close()
                return
            served += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Connection: keep-alive\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()

    async def scenario() -> list[int]:
        server = await asyncio.start_server(upstream, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        app = create_app(settings, "unused-model-path", "base-model", kafka=False)
        gateway = app.state.gateway
        statuses = []
        async with aiohttp.ClientSession() as session:
            gateway.session = session
            replica = Replica(0, ReplicaClient(f"http://127.0.0.1:{port}", session),
                              state="ready")
            gateway.pool.replicas.append(replica)
            gateway.pool.routing = RoutingTable().with_route(Route("support-bot", None))
            raw = json.dumps({"model": "support-bot", "messages": CHAT}).encode()
            for _ in range(4):
                resp = await gateway.serve(raw, "chat", "127.0.0.1", None)
                statuses.append(resp.status_code)
            statuses.append(int(replica.state == "ready"))
        server.close()
        return statuses

    assert asyncio.run(scenario()) == [200, 200, 200, 200, 1]
    assert dropped  # the stand-in did drop reused connections


def test_a_connection_reset_before_any_answer_goes_to_the_other_replica(
        tmp_path: Path) -> None:
    """A replica being killed can reset a connection it had accepted: nothing reached the
    user, so the request goes to the other replica (it was once answered 504, 'took
    longer than 300s', half a second in)."""
    import asyncio
    import socket
    import struct

    import aiohttp
    from aiohttp import web

    from tuneloop.serving.pool import Replica
    from tuneloop.serving.upstream import ReplicaClient

    settings = load_settings({"home": tmp_path, "serving.admin_key": KEY,
                              "serving.replica_urls": ["http://127.0.0.1:9"]})

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()  # RST, not FIN

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"id": "u1", "object": "chat.completion", "model": "m",
                                  "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                      "role": "assistant", "content": "card_arrival"}}]})

    async def scenario() -> tuple[list[int], list[str]]:
        dying = await asyncio.start_server(reset, "127.0.0.1", 0)
        healthy = web.Application()
        healthy.router.add_post("/v1/chat/completions", answer)
        runner = web.AppRunner(healthy)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports = [dying.sockets[0].getsockname()[1],
                 site._server.sockets[0].getsockname()[1]]  # type: ignore[union-attr]
        app = create_app(settings, "unused-model-path", "base-model", kafka=False)
        gateway = app.state.gateway
        statuses = []
        async with aiohttp.ClientSession() as session:
            gateway.session = session
            for i, port in enumerate(ports):
                gateway.pool.replicas.append(Replica(i, ReplicaClient(
                    f"http://127.0.0.1:{port}", session), state="ready"))
            gateway.pool.routing = RoutingTable().with_route(Route("support-bot", None))
            raw = json.dumps({"model": "support-bot", "messages": CHAT}).encode()
            for _ in range(4):
                resp = await gateway.serve(raw, "chat", "127.0.0.1", None)
                statuses.append(resp.status_code)
        states = [r.state for r in gateway.pool.replicas]
        dying.close()
        await runner.cleanup()
        return statuses, states

    statuses, states = asyncio.run(scenario())
    assert statuses == [200, 200, 200, 200]
    assert states[0] != "ready" and states[1] == "ready"
