"""Every route of the gateway, attached to its app by :func:`attach_routes`.

The public routes live in :mod:`~tuneloop.serving.gateway.api_router`, the admin ones
in :mod:`~tuneloop.serving.gateway.admin_router` (mounted under ``/admin`` behind the
key), their request and error shapes in :mod:`~tuneloop.serving.gateway.protocol`, and
what they do in :mod:`~tuneloop.serving.gateway.serving` and
:mod:`~tuneloop.serving.gateway.admin`. Errors the handlers raise become OpenAI error
bodies here, so the official client raises the matching type: a bad request 4xx, a
failed swap 422 (the adapter's fault) or 502 (the engine's), no replica 503 with
``Retry-After``.
"""

from __future__ import annotations

from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from tuneloop.serving.gateway import admin_router, api_router
from tuneloop.serving.gateway.protocol import BadRequest, error_response
from tuneloop.serving.pool import NoReplicaError, SwapError


def attach_routes(app: Starlette, admin_key: SecretStr) -> None:
    """Add the public and admin routes and their error handling to ``app``, whose state
    holds the ``gateway`` (:class:`Gateway`) and ``admin`` (:class:`AdminService`)."""
    app.router.routes.extend([*api_router.ROUTES, admin_router.admin_mount(admin_key)])
    app.add_exception_handler(BadRequest, _bad_request)
    app.add_exception_handler(SwapError, _swap_failed)
    app.add_exception_handler(NoReplicaError, _no_replica)


def _bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequest)
    return error_response(exc.status, exc.message, param=exc.param, code=exc.code)


def _swap_failed(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SwapError)
    return error_response(422 if exc.client_error else 502, str(exc), code="swap_failed")


def _no_replica(request: Request, exc: Exception) -> Response:
    return error_response(503, str(exc), kind="service_unavailable",
                          headers={"Retry-After": "5"})
