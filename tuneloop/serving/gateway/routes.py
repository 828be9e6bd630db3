"""The gateway's HTTP routes: OpenAI-compatible inference, feedback, metrics, admin.

``/admin/v1/...`` is the internal route: the same OpenAI protocol for one exact
adapter version, used by the canary's offline gate and the production check. Only
the routes below exist: vLLM's own admin routes (runtime LoRA load and
unload) are never proxied. Admin routes need the API key (``Authorization: Bearer``
or ``x-api-key``): 401 without it.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute

from tuneloop.serving.gateway.protocol import (
    USER_HEADER,
    BadRequest,
    FeedbackRequest,
    RouteRequest,
    VersionRequest,
    error_response,
)
from tuneloop.serving.gateway.serving import Gateway
from tuneloop.serving.pool import NoReplicaError, SwapError
from tuneloop.serving.routing import Route, upstream_name

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
M = TypeVar("M", bound=BaseModel)


def build_routes(gateway: Gateway, admin_key: str, default_alias: str,
                 on_route_change: Callable[[Route], None]) -> list[HttpRoute]:
    """The route table of one gateway."""

    async def chat(request: Request) -> Response:
        return await gateway.serve(await request.body(), "chat", _client(request),
                                   request.headers.get(USER_HEADER))

    async def completions(request: Request) -> Response:
        return await gateway.serve(await request.body(), "completions", _client(request),
                                   request.headers.get(USER_HEADER))

    async def models(request: Request) -> Response:
        now = int(time.time())
        data = [{"id": alias, "object": "model", "created": now, "owned_by": "tuneloop",
                 "production": r.production, "candidate": r.candidate}
                for alias, r in sorted(gateway.pool.routing.routes.items())]
        return JSONResponse({"object": "list", "data": data})

    async def feedback(request: Request) -> Response:
        try:
            body = _model(FeedbackRequest, await request.body())
            return JSONResponse(await gateway.feedback(body), status_code=202)
        except BadRequest as exc:
            return error_response(exc.status, exc.message, param=exc.param, code=exc.code)

    async def health(request: Request) -> Response:
        ok = gateway.pool.ready()
        return JSONResponse({"status": "ok" if ok else "unavailable"},
                            status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        for r in gateway.pool.replicas:
            gateway.metrics.replica_ready.labels(str(r.index)).set(r.state == "ready")
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------ admin
    def admin(handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            given = request.headers.get("x-api-key") or \
                request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not given or not hmac.compare_digest(given.encode(), admin_key.encode()):
                return error_response(401, "admin routes need the gateway's API key "
                                      "(Authorization: Bearer KEY); see serving.admin_key",
                                      kind="authentication_error")
            try:
                return await handler(request)
            except BadRequest as exc:
                return error_response(exc.status, exc.message, param=exc.param, code=exc.code)
            except SwapError as exc:
                gateway.metrics.swaps.labels(default_alias, "failed").inc()
                return error_response(422 if exc.client_error else 502, str(exc),
                                      code="swap_failed")
            except NoReplicaError as exc:
                return error_response(503, str(exc), kind="service_unavailable",
                                      headers={"Retry-After": "5"})
        return guarded

    async def state(request: Request) -> Response:
        return JSONResponse(describe(gateway))

    async def set_route(request: Request) -> Response:
        body = _model(RouteRequest, await request.body())
        alias = body.alias or default_alias
        current = gateway.pool.routing.get(alias) or Route(alias, None)
        given = body.model_fields_set
        try:
            route = Route(
                alias,
                body.production if "production" in given else current.production,
                body.candidate if "candidate" in given else current.candidate,
                body.canary_share if body.canary_share is not None else current.canary_share,
                body.shadow_share if body.shadow_share is not None else current.shadow_share,
            )
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        timings = await gateway.pool.set_route(route)
        gateway.metrics.swaps.labels(alias, "ok").inc()
        gateway.metrics.swap_seconds.labels(alias).observe(timings.total_s)
        on_route_change(route)
        return JSONResponse({"route": _route(route), "timings": timings.__dict__
                             | {"total_s": timings.total_s}})

    async def load(request: Request) -> Response:
        body = _model(VersionRequest, await request.body())
        timings = await gateway.pool.preload(body.alias or default_alias, body.version)
        return JSONResponse({"loaded": body.version, "timings": timings.__dict__})

    async def evaluate_chat(request: Request) -> Response:
        return await gateway.serve_internal(await request.body(), "chat")

    async def evaluate_completions(request: Request) -> Response:
        return await gateway.serve_internal(await request.body(), "completions")

    async def observations(request: Request) -> Response:
        alias = request.query_params.get("alias") or default_alias
        try:
            since = float(request.query_params.get("since", "0"))
            until = float(request.query_params["until"]) if "until" in request.query_params \
                else None
        except ValueError:
            raise BadRequest("since, until: seconds since the epoch, e.g. 1795000000.5",
                             param="since") from None
        return JSONResponse({"alias": alias, "since": since, "until": until,
                             "versions": gateway.observations.since(alias, since, until)})

    async def unload(request: Request) -> Response:
        body = _model(VersionRequest, await request.body())
        await gateway.pool.unload(body.alias or default_alias, body.version)
        return JSONResponse({"unloaded": body.version})

    return [
        HttpRoute("/v1/chat/completions", chat, methods=["POST"]),
        HttpRoute("/v1/completions", completions, methods=["POST"]),
        HttpRoute("/v1/models", models, methods=["GET"]),
        HttpRoute("/v1/feedback", feedback, methods=["POST"]),
        HttpRoute("/health", health, methods=["GET"]),
        HttpRoute("/metrics", metrics, methods=["GET"]),
        HttpRoute("/admin/state", admin(state), methods=["GET"]),
        HttpRoute("/admin/route", admin(set_route), methods=["POST"]),
        HttpRoute("/admin/load", admin(load), methods=["POST"]),
        HttpRoute("/admin/unload", admin(unload), methods=["POST"]),
        HttpRoute("/admin/observations", admin(observations), methods=["GET"]),
        # The internal route: one exact version, for the canary's offline evaluation.
        HttpRoute("/admin/v1/chat/completions", admin(evaluate_chat), methods=["POST"]),
        HttpRoute("/admin/v1/completions", admin(evaluate_completions), methods=["POST"]),
    ]


def describe(gateway: Gateway) -> dict[str, Any]:
    """Routes and replicas as ``/admin/state`` and ``tuneloop status`` show them."""
    pool = gateway.pool
    return {
        "routes": [_route(r) for r in pool.routing.routes.values()],
        "replicas": [{"index": r.index, "url": r.url, "state": r.state, "inflight": r.inflight,
                      "restarts": r.restarts, "loaded": sorted(r.loaded),
                      "managed": r.spec is not None, "last_error": r.last_error}
                     for r in pool.replicas],
        "grace": [{"alias": a, "version": v, "unload_in_s": round(t - time.monotonic(), 1)}
                  for (a, v), t in pool.grace.items()],
        "errors": [{"alias": a, "version": v, "error": e} for (a, v), e in pool.errors.items()],
        "base_model": pool.base_name,
    }


def _route(route: Route) -> dict[str, Any]:
    return {"alias": route.alias, "production": route.production, "candidate": route.candidate,
            "canary_share": route.canary_share, "shadow_share": route.shadow_share,
            "production_name": upstream_name(route.alias, route.production, "base")}


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


def _model(model: type[M], raw: bytes) -> M:
    try:
        return model.model_validate(json.loads(raw or b"{}"))
    except (ValueError, ValidationError) as exc:
        detail = exc.errors()[0] if isinstance(exc, ValidationError) else None
        where = ".".join(str(p) for p in detail["loc"]) if detail else None
        message = f"{where}: {detail['msg']}" if detail else f"invalid JSON: {exc}"
        raise BadRequest(message, param=where) from None
