"""The gateway's public routes: OpenAI-compatible inference, feedback, health and metrics.

One handler per route; each reads the :class:`Gateway` from ``request.app.state`` and
leaves the work to it. Only these routes exist: vLLM's own routes (runtime LoRA load
and unload among them) are never proxied.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tuneloop.serving.gateway.protocol import (
    FEEDBACK_TOKEN_HEADER,
    USER_HEADER,
    BadRequest,
    FeedbackRequest,
    parse_model,
)
from tuneloop.serving.gateway.serving import Gateway


def gateway(request: Request) -> Gateway:
    """The gateway the app serves (``app.state.gateway``)."""
    service: Gateway = request.app.state.gateway
    return service


async def chat_completions(request: Request) -> Response:
    """``POST /v1/chat/completions``: the alias's routed version answers."""
    return await gateway(request).serve(await json_body(request), "chat", _client(request),
                                        request.headers.get(USER_HEADER))


async def completions(request: Request) -> Response:
    """``POST /v1/completions``: the alias's routed version answers one prompt."""
    return await gateway(request).serve(await json_body(request), "completions",
                                        _client(request), request.headers.get(USER_HEADER))


async def list_models(request: Request) -> Response:
    """``GET /v1/models``: the aliases served, with their production and candidate."""
    now = int(time.time())
    data = [{"id": alias, "object": "model", "created": now, "owned_by": "tuneloop",
             "production": r.production, "candidate": r.candidate}
            for alias, r in sorted(gateway(request).pool.routing.routes.items())]
    return JSONResponse({"object": "list", "data": data})


async def create_feedback(request: Request) -> Response:
    """``POST /v1/feedback``: a verdict on a served answer, sent on as a feedback event
    (202). A bad or unknown request raises :class:`BadRequest` (4xx)."""
    body = parse_model(FeedbackRequest, await json_body(request),
                       gateway(request).cfg.max_json_depth)
    return JSONResponse(await gateway(request).feedback(body, _client(request)), status_code=202)


async def feedback_pair(request: Request) -> Response:
    """``GET /v1/feedback/pair?response_id=...``: the answer its user got beside the
    candidate's unseen answer to the same request, for a side-by-side verdict. The
    answer's feedback token goes in the ``x-tuneloop-feedback-token`` header."""
    response_id = request.query_params.get("response_id", "")
    if not response_id:
        raise BadRequest("response_id is required", param="response_id")
    token = request.headers.get(FEEDBACK_TOKEN_HEADER, "")
    return JSONResponse(await gateway(request).pair(response_id, token))


async def health(request: Request) -> Response:
    """``GET /health``: 200 while a replica takes traffic, else 503."""
    ok = gateway(request).pool.ready()
    return JSONResponse({"status": "ok" if ok else "unavailable"},
                        status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    """``GET /metrics``: the gateway's and the loop's figures, for Prometheus."""
    service = gateway(request)
    for r in service.pool.replicas:
        service.metrics.replica_ready.labels(str(r.index)).set(r.state == "ready")
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def json_body(request: Request) -> bytes:
    """The body of a public POST, read up to ``serving.max_body_bytes``. Raises
    :class:`BadRequest`: 415 unless it is declared ``application/json`` (a page on another
    site can post ``text/plain`` from a user's browser without asking; JSON it cannot),
    413 when it is larger than the limit, declared or not."""
    limit = gateway(request).cfg.max_body_bytes
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise BadRequest(f"Content-Type must be application/json, not {media or 'none'}",
                         status=415, code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> BadRequest:
    return BadRequest(f"the request body is larger than {limit} bytes (serving.max_body_bytes)",
                      status=413, code="request_too_large")


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/feedback", create_feedback, methods=["POST"]),
    Route("/v1/feedback/pair", feedback_pair, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
