"""The gateway's logic: route a request to an adapter version, proxy it to vLLM, account for it.

The data path is deliberately thin: parse the body once, pick the version (sticky
canary split), rewrite ``model`` to the versioned vLLM name, and stream vLLM's bytes
back as they arrive (aiohttp upstream). What the gateway learns from an answer (its
text, for feedback and shadow comparison; metrics) is taken after the last byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import random
import sqlite3
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from limits import parse as parse_limit
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.responses import Response, StreamingResponse

from tuneloop.runtime.settings import ServingSettings
from tuneloop.services.feedback.contract import FeedbackEvent, InvalidEvent
from tuneloop.services.feedback.producer import FeedbackProducer, OutboxFull, RecordTooLarge
from tuneloop.services.feedback.signing import feedback_token
from tuneloop.serving.gateway.answers import (
    ResponseCache,
    Served,
    feedback_event,
    pair_view,
    preference_event,
    shadow_answer,
    shadow_pair,
    shadow_response_id,
    user_id,
    verdict_of,
)
from tuneloop.serving.gateway.protocol import (
    ALIAS_HEADER,
    FEEDBACK_TOKEN_HEADER,
    RESPONSE_ID_HEADER,
    VERSION_HEADER,
    BadRequest,
    FeedbackRequest,
    check_chat,
    check_completion,
    check_limits,
    completion_text,
    completion_tokens,
    error_response,
    parse_body,
    stream_answer,
    with_response_format,
    with_system_prompt,
)
from tuneloop.serving.gateway.responses import ResponseStore
from tuneloop.serving.metrics import GatewayMetrics
from tuneloop.serving.observations import Observations
from tuneloop.serving.pool import NoReplicaError, Replica, ReplicaPool
from tuneloop.serving.routing import Route, upstream_name
from tuneloop.serving.upstream import error_message

log = logging.getLogger(__name__)

_RETRY_AFTER = {"Retry-After": "2"}


class Gateway:
    """Everything a request goes through between the routes and vLLM."""

    def __init__(self, cfg: ServingSettings, pool: ReplicaPool, metrics: GatewayMetrics,
                 feedback: FeedbackProducer | None, shadow: FeedbackProducer | None,
                 user_key: bytes, event_key: bytes,
                 system_prompts: dict[str, str] | None = None,
                 response_formats: dict[str, dict[str, Any]] | None = None) -> None:
        self.cfg = cfg
        # Each alias's task system prompt (tasks.<alias>.system_prompt): a chat without a
        # system turn gets it first, as curation gives it to every example.
        self.system_prompts = dict(system_prompts or {})
        # A json alias's schema as a response_format (tasks.<alias>.decode_with_schema):
        # users and the offline gate alike get answers decoded under it.
        self.response_formats = dict(response_formats or {})
        self.user_key = user_key
        self.event_key = event_key
        # Verdicts per user and minute (serving.feedback_per_minute), in this process.
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._feedback_rate = parse_limit(f"{cfg.feedback_per_minute}/minute")
        self.pool = pool
        self.metrics = metrics
        self.feedback_producer = feedback
        self.shadow_producer = shadow
        self.cache = ResponseCache(cfg.response_cache, cfg.response_cache_bytes)
        # What each answer's user last said of it (a rating, a preference) and how many
        # times they changed it, for the event ids of verdicts changed back.
        self._verdicts: OrderedDict[tuple[str, str], tuple[str, int]] = OrderedDict()
        # One verdict at a time on an answer (by stripe): a change posted while another is on
        # its way counts from it.
        self._verdict_locks = [asyncio.Lock() for _ in range(64)]
        self.responses: ResponseStore | None = None  # the durable copy (create_app sets it)
        self.session: aiohttp.ClientSession | None = None
        # Connecting is the only wait that says the replica is gone; waiting for the first
        # byte (the whole answer, unless streamed) or inside a stream is the generation's.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.upstream_connect_timeout_s)
        self._shadow_timeout = aiohttp.ClientTimeout(total=cfg.upstream_timeout_s,
                                                     sock_connect=cfg.upstream_connect_timeout_s)
        self._background: set[asyncio.Task[None]] = set()
        self.observations = Observations()

    # ------------------------------------------------------------ serving
    async def serve(self, raw: bytes, endpoint: str, client_host: str,
                    user_header: str | None) -> Response:
        """Answer a user's request (``endpoint`` ``chat`` or ``completions``) with the
        version its alias routes the user to. Never raises: a bad request is a 4xx
        OpenAI error, no replica a 503 with ``Retry-After``, vLLM's failure a 502."""
        chat = endpoint == "chat"
        try:
            body = parse_body(raw, self.cfg.max_json_depth)
            check_limits(body, self.cfg.max_tokens, self.cfg.max_n)
            route = self.pool.routing.get(body["model"])
            if route is None:
                known = ", ".join(sorted(self.pool.routing.routes)) or "none yet"
                raise BadRequest(f"model {body['model']!r} is not served here; aliases: {known}",
                                 param="model", status=404, code="model_not_found")
            messages = check_chat(body) if chat else check_completion(body)
            if chat and route.alias in self.system_prompts:
                body, messages = with_system_prompt(body, messages,
                                                    self.system_prompts[route.alias])
            if chat:
                body = with_response_format(body, self.response_formats.get(route.alias))
        except BadRequest as exc:
            self.metrics.errors.labels("-", "-", "bad_request").inc()
            return error_response(exc.status, exc.message, param=exc.param, code=exc.code)
        user = body.get("user") if isinstance(body.get("user"), str) else None
        # Who asked: the client's `user`, else its host. The canary's unit: its bucket, and
        # one voice in the live window.
        user = user or user_header or f"host:{client_host}"
        # The bucket comes from a keyed hash: a client cannot work out offline which `user`
        # strings land on the canary.
        version = route.choose(user_id(user, self.user_key))
        served = Served(f"resp-{uuid.uuid4().hex}", route.alias, version, chat, messages, user,
                        body, nbytes=len(raw))
        upstream = dict(body, model=upstream_name(route.alias, version, self.pool.base_name))
        payload = json.dumps(upstream).encode()
        stream = bool(body.get("stream"))
        return await self._forward(route, served, payload, stream)

    async def serve_internal(self, raw: bytes, endpoint: str) -> Response:
        """An evaluation request for one exact version (``support-bot-v7``, or the base
        model's name), on the admin route: the canary's offline gate. The version must be
        loaded (``/admin/load``); nothing is recorded as user traffic."""
        chat = endpoint == "chat"
        try:
            body = parse_body(raw)
            alias, version = self._resolve_name(body["model"])
            messages = check_chat(body) if chat else check_completion(body)
            if chat:
                body = with_response_format(body, self.response_formats.get(alias))
        except BadRequest as exc:
            return error_response(exc.status, exc.message, param=exc.param, code=exc.code)
        served = Served(f"eval-{uuid.uuid4().hex}", alias, version, chat, messages, None, body,
                        internal=True)
        payload = json.dumps(body).encode()
        return await self._forward(Route(alias, version), served, payload,
                                   bool(body.get("stream")))

    def _resolve_name(self, name: str) -> tuple[str, str | None]:
        if name == self.pool.base_name:
            return self.cfg.alias, None
        for r in self.pool.replicas:
            if name in r.loaded:
                alias, _, version = name.rpartition("-")
                return alias, version
        raise BadRequest(f"{name!r} is not loaded on any replica; load it with POST "
                         "/admin/load first", param="model", status=409, code="not_loaded")

    async def _forward(self, route: Route, served: Served, payload: bytes,
                       stream: bool) -> Response:
        assert self.session is not None
        endpoint = _endpoint(served)
        path = "/v1/chat/completions" if served.chat else "/v1/completions"
        name = upstream_name(route.alias, served.version, self.pool.base_name)
        version_label = served.version or "base"
        headers = {VERSION_HEADER: version_label, RESPONSE_ID_HEADER: served.response_id,
                   ALIAS_HEADER: route.alias, FEEDBACK_TOKEN_HEADER: feedback_token(
                       self.event_key, served.response_id, served.user)}
        started = time.perf_counter()
        tried: set[int] = set()
        stale_retried: set[int] = set()
        while True:
            try:
                replica = self.pool.pick(name)
            except NoReplicaError as exc:
                return self._unavailable(served, str(exc))
            if replica.index in tried:
                return self._unavailable(served, f"every replica failed for {name}")
            tried.add(replica.index)
            self.pool.acquire(replica, name)
            self.metrics.replica_requests.labels(str(replica.index)).inc()
            self.metrics.inflight.inc()
            try:
                resp = await asyncio.wait_for(self.session.post(
                    replica.url + path, data=payload, timeout=self._timeout,
                    headers={"content-type": "application/json"}), self.cfg.upstream_timeout_s)
            except aiohttp.ServerDisconnectedError as exc:
                self._done(replica, name)
                if replica.index not in stale_retried:
                    # Most often a pooled connection the replica closed as it was reused:
                    # the request never reached it. Once more, on a new connection.
                    stale_retried.add(replica.index)
                    tried.discard(replica.index)
                    continue
                # Gone before answering, twice: nothing was generated, so another replica
                # may take the request, and this one is checked before its next.
                self.pool.report_failure(replica, f"{type(exc).__name__}: {exc}")
                continue
            except aiohttp.ClientOSError as exc:
                # Not reached, or the connection reset before any answer (a replica being
                # killed): no byte reached the client, so another replica may take the
                # request, and this one is checked before its next.
                self._done(replica, name)
                self.pool.report_failure(replica, f"{type(exc).__name__}: {exc}")
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The replica took the request and is working on it (or was slow to): the
                # generation's time ran out, not the replica. No retry: it would do the
                # same work again, elsewhere.
                self._done(replica, name)
                return self._timed_out(served, exc)
            break
        self.metrics.first_byte.labels(route.alias, version_label, endpoint).observe(
            time.perf_counter() - started)
        if resp.status >= 400 or not stream:
            try:
                raw = await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._done(replica, name)
                self.pool.report_failure(replica, str(exc))
                return self._unavailable(served,
                                         f"replica {replica.index} failed mid-answer: {exc}")
            finally:
                resp.release()
            self._done(replica, name)
            return await self._finish_plain(route, served, resp.status, raw, headers, started)
        return StreamingResponse(self._relay(route, served, replica, name, resp, started),
                                 status_code=resp.status, media_type="text/event-stream",
                                 headers=headers)

    def _timed_out(self, served: Served, exc: BaseException) -> Response:
        alias, version = served.alias, served.version or "base"
        self.metrics.errors.labels(alias, version, "timeout").inc()
        self._observe(served, False, self.cfg.upstream_timeout_s)
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.warning("504 for %s (%s) after %.0fs: %s", alias, version,
                    self.cfg.upstream_timeout_s, why)
        return error_response(504, f"{alias} took longer than {self.cfg.upstream_timeout_s:.0f}s "
                              "(serving.upstream_timeout_s) to answer; ask for fewer tokens, "
                              "stream, or retry", kind="timeout", code="upstream_timeout")

    def _done(self, replica: Replica, name: str) -> None:
        self.pool.release(replica, name)
        self.metrics.inflight.dec()

    async def _finish_plain(self, route: Route, served: Served, status: int, raw: bytes,
                      headers: dict[str, str], started: float) -> Response:
        endpoint = _endpoint(served)
        version_label = served.version or "base"
        elapsed = time.perf_counter() - started
        self.metrics.requests.labels(route.alias, version_label, endpoint, str(status)).inc()
        self.metrics.latency.labels(route.alias, version_label, endpoint).observe(elapsed)
        if status >= 400:
            if status >= 500:  # a client's own bad request says nothing of the version
                self._observe(served, False, elapsed)
            kind = "bad_request" if status < 500 else "upstream"
            self.metrics.errors.labels(route.alias, version_label, kind).inc()
            if status >= 500:
                return error_response(502, f"vLLM failed: {error_message(raw)}",
                                      headers=headers)
            return Response(raw, status_code=status, media_type="application/json",
                            headers=headers)
        tokens = None
        try:
            data = json.loads(raw)
            # The answer's id is the response id, so `completion.id` is what feedback cites.
            data["id"] = served.response_id
            raw = json.dumps(data).encode()
            served.completion = completion_text(data, served.chat)
            tokens = completion_tokens(data)
        except (ValueError, TypeError, AttributeError):
            pass  # not an answer's JSON: relayed as it came
        self._observe(served, True, elapsed, tokens)
        served.latency_s = elapsed
        await self._after(route, served, None)
        return Response(raw, status_code=status, media_type="application/json", headers=headers)

    async def _relay(self, route: Route, served: Served, replica: Replica, name: str,
                     resp: aiohttp.ClientResponse, started: float) -> AsyncIterator[bytes]:
        endpoint = _endpoint(served)
        version_label = served.version or "base"
        chunks: list[bytes] = []
        status = str(resp.status)
        held: bytes | None = None  # the last chunk waits until the answer is on disk
        try:
            while chunk := await asyncio.wait_for(resp.content.readany(),
                                                  self.cfg.upstream_idle_timeout_s):
                chunks.append(chunk)
                if held is not None:
                    yield held
                held = chunk
        except TimeoutError:
            # Silent too long: end this answer; the replica may only be busy.
            status = "504"
            self.metrics.errors.labels(route.alias, version_label, "timeout").inc()
            error = {"error": {"message": f"the answer stalled for more than "
                                          f"{self.cfg.upstream_idle_timeout_s:.0f}s "
                                          "(serving.upstream_idle_timeout_s); retry the request",
                               "type": "timeout", "code": 504}}
            if held is not None:
                yield held
            yield f"data: {json.dumps(error)}\n\n".encode()
        except aiohttp.ClientError as exc:
            # Headers are gone already: end the stream with an error event the client raises.
            status = "503"
            self.metrics.errors.labels(route.alias, version_label, "unavailable").inc()
            self.pool.report_failure(replica, str(exc))
            error = {"error": {"message": f"replica {replica.index} failed mid-stream: {exc}; "
                                          "retry the request", "type": "server_error",
                               "code": 503}}
            if held is not None:
                yield held
            yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            resp.release()
            self._done(replica, name)
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(route.alias, version_label, endpoint, status).inc()
            self.metrics.latency.labels(route.alias, version_label, endpoint).observe(elapsed)
            answer = stream_answer(b"".join(chunks), served.chat) if status == "200" else None
            self._observe(served, answer is not None, elapsed,
                          answer.tokens if answer is not None else None)
        if answer is not None:
            served.completion = answer.text
            served.latency_s = time.perf_counter() - started
            await self._after(route, served, answer.upstream_id)
        if held is not None and status == "200":
            yield held

    def _unavailable(self, served: Served, why: str) -> Response:
        alias, version = served.alias, served.version or "base"
        self.metrics.errors.labels(alias, version, "unavailable").inc()
        self._observe(served, False, 0.0)
        log.warning("503 for %s (%s): %s", alias, version, why)
        return error_response(503, f"{alias} is not available right now: {why}; retry shortly",
                              kind="service_unavailable", headers=_RETRY_AFTER)

    def _observe(self, served: Served, ok: bool, latency_s: float,
                 tokens: int | None = None) -> None:
        if not served.internal:
            self.observations.record(served.alias, served.version, ok, latency_s, tokens)

    # ------------------------------------------------------------ after an answer
    async def _after(self, route: Route, served: Served, upstream_id: str | None) -> None:
        """What the gateway keeps of an answer, made durable before its client gets the
        last of it: the answer itself (for feedback, after a restart too), its sampled
        event (in the outbox), and the shadow comparison it is owed."""
        if served.internal:
            return
        self.cache.put(served, upstream_id)
        shadow = route.candidate if (served.version == route.production and
                                     route.shadow(served.response_id)) else None
        if self.responses is not None:
            await asyncio.to_thread(self.responses.put, served, upstream_id,
                                    shadow if self.shadow_producer is not None else None)
        if self.feedback_producer is not None and self.cfg.sample_requests > 0 and \
                random.random() < self.cfg.sample_requests:
            event = feedback_event(served, "gateway.served", user_key=self.user_key,
                                   event_key=self.event_key)
            await self._emit(event, "served")
        if shadow is not None:
            self._spawn(self._shadow(route.alias, shadow, served))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _emit(self, event: FeedbackEvent, kind: str) -> None:
        assert self.feedback_producer is not None
        try:
            await asyncio.to_thread(self.feedback_producer.send, event)
            self.metrics.feedback.labels(kind).inc()
        except InvalidEvent as exc:
            self.metrics.dropped.labels(kind, "invalid").inc()
            log.warning("%s event for %s not sent: %s", kind, event.request_id, exc.reason)
        except OutboxFull as exc:
            self.metrics.dropped.labels(kind, "outbox_full").inc()
            log.warning("%s event for %s dropped: %s", kind, event.request_id, exc)

    async def resume_shadows(self, wait_s: float) -> None:
        """Run again the shadow comparisons a previous gateway owed and never finished
        (their candidate still the canary; the others are dropped), once a replica is
        ready (waiting at most ``wait_s``)."""
        if self.responses is None:
            return
        deadline = time.monotonic() + wait_s
        while not self.pool.ready() and time.monotonic() < deadline:
            await asyncio.sleep(1)
        for served, candidate in await asyncio.to_thread(self.responses.pending_shadows):
            route = self.pool.routing.get(served.alias)
            if route is not None and route.candidate == candidate:
                await self._shadow(served.alias, candidate, served)
            else:
                await asyncio.to_thread(self.responses.shadow_done, served.response_id)

    async def _shadow(self, alias: str, candidate: str, served: Served) -> None:
        """The candidate answers the same request unseen; the pair goes to Kafka."""
        assert self.session is not None
        if self.shadow_producer is None:
            return
        name = upstream_name(alias, candidate, self.pool.base_name)
        body = dict(served.body, model=name, stream=False)
        path = "/v1/chat/completions" if served.chat else "/v1/completions"
        started = time.perf_counter()
        try:
            replica = self.pool.pick(name)
            async with self.session.post(replica.url + path, json=body,
                                         timeout=self._shadow_timeout) as resp:
                data = await resp.json(content_type=None)
                status = resp.status
        except (NoReplicaError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.info("shadow request for %s skipped: %s", served.response_id, exc)
            return
        latency_s = time.perf_counter() - started
        text = completion_text(data, served.chat) if status < 400 else None
        pair = shadow_pair(served, candidate, text, status, latency_s)
        try:
            await asyncio.to_thread(self.shadow_producer.send_record, pair["pair_id"],
                                    json.dumps(pair).encode())
        except (OutboxFull, RecordTooLarge) as exc:
            reason = "outbox_full" if isinstance(exc, OutboxFull) else "too_large"
            self.metrics.dropped.labels("shadow", reason).inc()
            log.warning("shadow pair of %s dropped: %s", served.response_id, exc)
        else:
            self.metrics.feedback.labels("shadow").inc()
        if self.responses is not None:
            await asyncio.to_thread(self.responses.shadow_done, served.response_id)
        if text is not None:  # kept, so its user can compare both answers and prefer one
            unseen = shadow_answer(served, candidate, text, latency_s)
            self.cache.put(unseen)
            if self.responses is not None:
                try:
                    await asyncio.to_thread(self.responses.put, unseen, None, None)
                except sqlite3.Error as exc:
                    log.warning("the unseen answer to %s is not kept on disk: %s",
                                served.response_id, exc)

    # ------------------------------------------------------------ feedback
    async def feedback(self, request: FeedbackRequest, client_host: str = "-") -> dict[str, Any]:
        """Turn a verdict on a served answer into a feedback v1 event; raises BadRequest.

        Only the user who received the answer can post on it (its feedback token), at most
        ``serving.feedback_per_minute`` verdicts a minute per user; a verdict posted again
        replaces the earlier one where it is counted (the last wins)."""
        if request.rating is None and request.correction is None and request.label is None \
                and request.preferred_response_id is None:
            raise BadRequest("feedback needs at least one of rating, correction, label or "
                             "preferred_response_id")
        if request.preferred_response_id is not None and (
                request.rating is not None or request.correction is not None
                or request.label is not None):
            raise BadRequest("a side-by-side verdict (preferred_response_id) is posted on its "
                             "own; send a rating, correction or label in another request",
                             param="preferred_response_id")
        served = await self._rated_answer(request.response_id, request.token)
        lock = self._verdict_locks[zlib.crc32(served.response_id.encode()) % 64]
        async with lock:
            return await self._take_verdict(served, request, client_host)

    async def _take_verdict(self, served: Served, request: FeedbackRequest,
                            client_host: str) -> dict[str, Any]:
        event: FeedbackEvent
        if request.preferred_response_id is not None:
            source, said = "gateway.preference", request.preferred_response_id
        else:
            source, said = "gateway.feedback", verdict_of(request)
        change = await self._change_of(served.response_id, source, said)
        if request.preferred_response_id is not None:
            shadow = await self._shadow_of(served)
            try:
                event = preference_event(served, shadow, request.preferred_response_id, request,
                                         user_key=self.user_key, event_key=self.event_key,
                                         change=change)
            except ValueError:
                raise BadRequest(
                    f"preferred_response_id must be {served.response_id} or "
                    f"{shadow.response_id}, the two answers of the pair",
                    param="preferred_response_id") from None
        else:
            event = feedback_event(served, "gateway.feedback", request, user_key=self.user_key,
                                   event_key=self.event_key, change=change)
        if not self._limiter.hit(self._feedback_rate, served.user or f"host:{client_host}"):
            self.metrics.dropped.labels("feedback", "rate_limited").inc()
            raise BadRequest(f"more than {self.cfg.feedback_per_minute} verdicts a minute from "
                             "this user (serving.feedback_per_minute); retry later",
                             status=429, code="rate_limited")
        if self.feedback_producer is None:
            raise BadRequest("this gateway has no Kafka producer configured", status=503)
        try:
            await asyncio.to_thread(self.feedback_producer.send, event)
        except InvalidEvent as exc:
            raise BadRequest(f"feedback is not a valid event: {exc.reason}") from None
        except OutboxFull:
            self.metrics.dropped.labels("feedback", "outbox_full").inc()
            raise BadRequest("the gateway's outbox is full while Kafka is unreachable; "
                             "retry later", status=503, code="outbox_full") from None
        self.metrics.feedback.labels("feedback").inc()
        await self._said(served.response_id, source, said, change)
        return {"object": "feedback", "event_id": str(event.event_id),
                "response_id": served.response_id, "adapter_version": served.version,
                "status": "accepted"}

    async def _change_of(self, response_id: str, source: str, said: str) -> int:
        """How many times the user had changed their verdict on ``response_id`` before
        this one (:func:`~tuneloop.serving.gateway.answers.feedback_event`): the last
        count for the same verdict again, one more for another."""
        last = self._verdicts.get((response_id, source))
        if last is None and self.responses is not None:  # kept on disk: a restart since
            last = await asyncio.to_thread(self.responses.last_verdict, response_id, source)
        if last is None:
            return 0
        return last[1] if last[0] == said else last[1] + 1

    async def _said(self, response_id: str, source: str, said: str, change: int) -> None:
        self._verdicts[(response_id, source)] = (said, change)
        self._verdicts.move_to_end((response_id, source))
        while len(self._verdicts) > self.cfg.response_cache:
            self._verdicts.popitem(last=False)
        if self.responses is not None:
            try:
                await asyncio.to_thread(self.responses.set_verdict, response_id, source, said,
                                        change)
            except sqlite3.Error as exc:
                log.warning("the verdict on %s is not kept on disk: %s", response_id, exc)

    async def pair(self, response_id: str, token: str) -> dict[str, Any]:
        """Both answers to the request of ``response_id``: the one its user got and the
        candidate's unseen one, for the user to say which is better (``POST /v1/feedback``
        with ``preferred_response_id``). Raises BadRequest: 403 for another's token, 404
        when the answer or its shadow is not kept."""
        served = await self._rated_answer(response_id, token)
        return pair_view(served, await self._shadow_of(served))

    async def _answer(self, key: str) -> Served | None:
        served = self.cache.get(key)
        if served is None and self.responses is not None:  # kept on disk: a restart since
            served = await asyncio.to_thread(self.responses.get, key)
        return served

    async def _rated_answer(self, response_id: str, token: str) -> Served:
        """The answer ``response_id``, when ``token`` is its user's; raises BadRequest."""
        served = await self._answer(response_id)
        if served is None or served.pair_of is not None:  # a shadow is rated through its pair
            raise BadRequest(
                f"response {response_id!r} is unknown or older than the last "
                f"{self.cfg.response_cache} answers; send a feedback event with the producer "
                "SDK instead", param="response_id", status=404, code="response_not_found")
        expected = feedback_token(self.event_key, served.response_id, served.user)
        if not hmac.compare_digest(expected, token):
            self.metrics.dropped.labels("feedback", "bad_token").inc()
            raise BadRequest("token: not this answer's feedback token (the "
                             f"{FEEDBACK_TOKEN_HEADER} header of the answer)", param="token",
                             status=403, code="invalid_feedback_token")
        return served

    async def _shadow_of(self, served: Served) -> Served:
        shadow = await self._answer(shadow_response_id(served.response_id))
        if shadow is None:
            raise BadRequest(f"response {served.response_id!r} has no unseen candidate answer "
                             "to compare with (it was not shadowed, or not yet)",
                             param="response_id", status=404, code="pair_not_found")
        return shadow

    async def drain(self) -> None:
        """Wait for background emits (shutdown)."""
        if self._background:
            with contextlib.suppress(Exception):
                await asyncio.wait(set(self._background), timeout=10)


def _endpoint(served: Served) -> str:
    """The metrics label: evaluation traffic is kept apart from users'."""
    if served.internal:
        return "evaluation"
    return "chat" if served.chat else "completions"
