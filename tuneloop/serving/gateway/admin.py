"""The gateway's admin logic: an alias's routing, adapter loads, state and observations.

What ``/admin/...`` does apart from HTTP: each handler in
:mod:`tuneloop.serving.gateway.admin_router` parses its request and calls one method
of :class:`AdminService`, which the app keeps in ``app.state.admin``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from starlette.responses import Response

from tuneloop.serving.gateway.protocol import BadRequest, RouteRequest, VersionRequest
from tuneloop.serving.gateway.serving import Gateway
from tuneloop.serving.pool import SwapError
from tuneloop.serving.routing import Route, upstream_name


class AdminService:
    """The admin operations of one gateway; ``on_route_change`` keeps each new route."""

    def __init__(self, gateway: Gateway, default_alias: str,
                 on_route_change: Callable[[Route], None]) -> None:
        self.gateway = gateway
        self.default_alias = default_alias
        self.on_route_change = on_route_change

    def state(self) -> dict[str, Any]:
        """Routes and replicas as ``/admin/state`` and ``tuneloop status`` show them."""
        pool = self.gateway.pool
        return {
            "routes": [route_body(r) for r in pool.routing.routes.values()],
            "replicas": [{"index": r.index, "url": r.url, "state": r.state,
                          "inflight": r.inflight, "restarts": r.restarts,
                          "loaded": sorted(r.loaded), "managed": r.spec is not None,
                          "unowned": r.unowned,
                          "last_error": r.last_error}
                         for r in pool.replicas],
            "grace": [{"alias": a, "version": v, "unload_in_s": round(t - time.monotonic(), 1)}
                      for (a, v), t in pool.grace.items()],
            "errors": [{"alias": a, "version": v, "error": e}
                       for (a, v), e in pool.errors.items()],
            "degraded": [{"alias": d.alias, "version": d.version, "role": d.role,
                          "serving": d.serving, "summary": d.summary()}
                         for d in pool.degraded.values()],
            "base_model": pool.base_name,
        }

    async def set_route(self, request: RouteRequest) -> dict[str, Any]:
        """Load and probe the request's versions everywhere, then flip the alias to them.

        Raises :class:`BadRequest` for a route that cannot be (a version both production
        and candidate), :class:`SwapError` (the old route still serves) or
        :class:`NoReplicaError`.
        """
        alias = request.alias or self.default_alias
        route = merged_route(self.gateway.pool.routing.get(alias) or Route(alias, None), request)
        with self._counting_failures(alias):
            timings = await self.gateway.pool.set_route(route)
        self.gateway.metrics.swaps.labels(alias, "ok").inc()
        self.gateway.metrics.swap_seconds.labels(alias).observe(timings.total_s)
        self.on_route_change(route)
        return {"route": route_body(route),
                "timings": timings.__dict__ | {"total_s": timings.total_s}}

    async def load(self, request: VersionRequest) -> dict[str, Any]:
        """Load and probe a version everywhere without routing to it (the canary's offline
        gate); raises :class:`SwapError` or :class:`NoReplicaError`."""
        alias = request.alias or self.default_alias
        with self._counting_failures(alias):
            timings = await self.gateway.pool.preload(alias, request.version)
        return {"loaded": request.version, "timings": timings.__dict__}

    async def unload(self, request: VersionRequest) -> dict[str, Any]:
        """Drop a version from every replica; raises :class:`SwapError` while it is routed."""
        alias = request.alias or self.default_alias
        with self._counting_failures(alias):
            await self.gateway.pool.unload(alias, request.version)
        return {"unloaded": request.version}

    def observations(self, alias: str | None, since: float,
                     until: float | None) -> dict[str, Any]:
        """Requests, errors and latencies per version of ``alias`` in ``[since, until)``."""
        alias = alias or self.default_alias
        return {"alias": alias, "since": since, "until": until,
                "versions": self.gateway.observations.since(alias, since, until)}

    async def evaluate(self, raw: bytes, endpoint: str) -> Response:
        """One exact loaded version answers, unrecorded (see :meth:`Gateway.serve_internal`)."""
        return await self.gateway.serve_internal(raw, endpoint)

    @contextlib.contextmanager
    def _counting_failures(self, alias: str) -> Iterator[None]:
        try:
            yield
        except SwapError:
            self.gateway.metrics.swaps.labels(alias, "failed").inc()
            raise


def merged_route(current: Route, request: RouteRequest) -> Route:
    """``current`` with the request's fields: an omitted field keeps its value, while an
    explicit null clears a version. Raises :class:`BadRequest` for an impossible route."""
    given = request.model_fields_set
    try:
        return Route(
            current.alias,
            request.production if "production" in given else current.production,
            request.candidate if "candidate" in given else current.candidate,
            current.canary_share if request.canary_share is None else request.canary_share,
            current.shadow_share if request.shadow_share is None else request.shadow_share,
        )
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def route_body(route: Route) -> dict[str, Any]:
    """A route as the admin routes answer it."""
    return {"alias": route.alias, "production": route.production, "candidate": route.candidate,
            "canary_share": route.canary_share, "shadow_share": route.shadow_share,
            "production_name": upstream_name(route.alias, route.production, "base")}
