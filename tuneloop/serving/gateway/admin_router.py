"""The gateway's admin routes, all under ``/admin`` behind one key check.

``/admin/v1/...`` is the internal route: the same OpenAI protocol for one exact
adapter version, used by the canary's offline gate and the production check. Every
admin route needs the API key (``Authorization: Bearer KEY`` or ``x-api-key: KEY``);
:class:`AdminAuth` answers 401 without it, before any handler runs. Each handler reads
the :class:`AdminService` from ``request.app.state``.
"""

from __future__ import annotations

import hmac

from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tuneloop.serving.gateway.admin import AdminService
from tuneloop.serving.gateway.protocol import (
    RouteRequest,
    VersionRequest,
    error_response,
    observation_window,
    parse_model,
)

PREFIX = "/admin"


class AdminAuth:
    """ASGI middleware: requests without the admin key get 401 and go no further."""

    def __init__(self, app: ASGIApp, key: SecretStr) -> None:
        self.app = app
        self._key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allowed(Headers(scope=scope)):
            denied = error_response(401, "admin routes need the gateway's API key "
                                    "(Authorization: Bearer KEY); see serving.admin_key",
                                    kind="authentication_error")
            await denied(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, headers: Headers) -> bool:
        given = headers.get("x-api-key") or \
            headers.get("authorization", "").removeprefix("Bearer ").strip()
        # Constant time, so the key cannot be guessed from response times.
        return bool(given) and hmac.compare_digest(given.encode(),
                                                   self._key.get_secret_value().encode())


def admin(request: Request) -> AdminService:
    """The admin service of the app (``app.state.admin``)."""
    service: AdminService = request.app.state.admin
    return service


async def state(request: Request) -> Response:
    """``GET /admin/state``: routes, replicas, adapters in their grace period, load errors."""
    return JSONResponse(admin(request).state())


async def set_route(request: Request) -> Response:
    """``POST /admin/route``: swap an alias's versions or shares (see :class:`RouteRequest`)."""
    body = parse_model(RouteRequest, await request.body())
    return JSONResponse(await admin(request).set_route(body))


async def load(request: Request) -> Response:
    """``POST /admin/load``: load and probe a version without routing to it."""
    body = parse_model(VersionRequest, await request.body())
    return JSONResponse(await admin(request).load(body))


async def unload(request: Request) -> Response:
    """``POST /admin/unload``: drop a version that no route uses."""
    body = parse_model(VersionRequest, await request.body())
    return JSONResponse(await admin(request).unload(body))


async def observations(request: Request) -> Response:
    """``GET /admin/observations?alias=&since=&until=``: raw per-request figures per version."""
    since, until = observation_window(request.query_params)
    return JSONResponse(admin(request).observations(request.query_params.get("alias"),
                                                    since, until))


async def evaluate_chat(request: Request) -> Response:
    """``POST /admin/v1/chat/completions``: one exact loaded version answers, unrecorded."""
    return await admin(request).evaluate(await request.body(), "chat")


async def evaluate_completions(request: Request) -> Response:
    """``POST /admin/v1/completions``: the same for a prompt."""
    return await admin(request).evaluate(await request.body(), "completions")


ROUTES = [
    Route("/state", state, methods=["GET"]),
    Route("/route", set_route, methods=["POST"]),
    Route("/load", load, methods=["POST"]),
    Route("/unload", unload, methods=["POST"]),
    Route("/observations", observations, methods=["GET"]),
    Route("/v1/chat/completions", evaluate_chat, methods=["POST"]),
    Route("/v1/completions", evaluate_completions, methods=["POST"]),
]


def admin_mount(key: SecretStr) -> Mount:
    """The admin routes under :data:`PREFIX`, behind :class:`AdminAuth` with ``key``."""
    return Mount(PREFIX, routes=ROUTES, middleware=[Middleware(AdminAuth, key=key)])
