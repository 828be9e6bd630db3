"""The gateway process: a Starlette app on uvicorn that owns the vLLM replicas.

At start-up it starts (or adopts, if already running) the managed vLLM replicas,
builds its routing from the registry, and begins supervising: restart a replica
whose process died, load the routed adapters on it, then let it take traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import uvicorn
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware

from tuneloop.runtime.files import write_json_atomic
from tuneloop.runtime.settings import Settings
from tuneloop.services.feedback.producer import FeedbackProducer
from tuneloop.services.loop.metrics import LoopCollector
from tuneloop.services.registry.core import Adapter
from tuneloop.serving.control import (
    admin_key,
    event_key,
    previous_productions,
    read_adapter,
    record_reconciled,
    record_routed_around,
    registry_route,
    routing_file,
    saved_shares,
    user_id_key,
)
from tuneloop.serving.gateway.admin import AdminService
from tuneloop.serving.gateway.protocol import ALIAS_HEADER, RESPONSE_ID_HEADER, USER_HEADER, VERSION_HEADER
from tuneloop.serving.gateway.reconcile import reconcile_forever
from tuneloop.serving.gateway.responses import ResponseStore
from tuneloop.serving.gateway.routes import attach_routes
from tuneloop.serving.gateway.serving import Gateway
from tuneloop.serving.metrics import GatewayMetrics
from tuneloop.serving.pool import Replica, ReplicaPool, RoutedAround
from tuneloop.serving.routing import Route, RoutingTable
from tuneloop.serving.upstream import ReplicaClient
from tuneloop.serving.vllm_process import ReplicaSpec, replica_specs, vllm_key

log = logging.getLogger(__name__)


# How long an idle connection to a replica is kept for reuse: below vLLM's own
# keep-alive (uvicorn's, VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s by default), so the gateway
# lets go of a connection before vLLM closes it under a request being sent.
UPSTREAM_KEEPALIVE_S = 4.0

def initial_route(settings: Settings) -> Route:
    """The alias's route as the registry has it, with the shares last applied."""
    alias = settings.serving.alias
    reg = registry_route(settings, alias)
    saved = saved_shares(settings)
    same = saved.get("candidate") == reg.canary
    return Route(
        alias, reg.production, reg.canary,
        float(saved.get("canary_share", settings.serving.canary_share)) if same
        else settings.serving.canary_share,
        float(saved.get("shadow_share", settings.serving.shadow_share)) if same
        else settings.serving.shadow_share,
    )


def _record_start_difference(settings: Settings, route: Route) -> None:
    """On start the route is the registry's: record it when the gateway served another
    before (it died between a promotion's flip and its commit, say)."""
    saved = saved_shares(settings)
    if not saved or saved.get("alias", route.alias) != route.alias:
        return
    was = Route(route.alias, saved.get("production"), saved.get("candidate"))
    if (was.production, was.candidate) != (route.production, route.candidate):
        log.warning("%s served production %s, canary %s before this start; the registry "
                    "says %s, %s", route.alias, was.production, was.candidate,
                    route.production, route.candidate)
        record_reconciled(settings, route.alias, was, route, "on start")
    save_route(settings, route)


def save_route(settings: Settings, route: Route) -> None:
    """Keep the shares across gateway restarts (versions come from the registry)."""
    write_json_atomic(routing_file(settings), {
        "alias": route.alias, "production": route.production, "candidate": route.candidate,
        "canary_share": route.canary_share, "shadow_share": route.shadow_share})


def create_app(settings: Settings, model_path: str, served_name: str,
               kafka: bool = True) -> Starlette:
    """The gateway for ``settings``; vLLM serves ``model_path`` as ``served_name``.

    Nothing starts until the app's lifespan does (uvicorn). Raises
    ``VLLMNotInstalledError`` when replicas are managed and vLLM is missing, and
    ``OSError`` when the admin key file cannot be read or created.
    """
    metrics = GatewayMetrics()
    # The loop's own figures (ingest, drift, retrain, canary) on the same /metrics.
    metrics.registry.register(LoopCollector(Path(settings.home)))
    specs = {s.index: s for s in replica_specs(settings, model_path, served_name)}
    feedback, shadow = _producers(settings) if kafka else (None, None)
    prompt, response_format = settings.task.system_prompt, settings.task.response_format()
    gateway = Gateway(settings.serving, _pool(settings, served_name, metrics), metrics,
                      feedback, shadow, user_id_key(settings), event_key(settings),
                      {settings.serving.alias: prompt} if prompt else None,
                      {settings.serving.alias: response_format} if response_format else None)
    gateway.responses = ResponseStore(Path(settings.home) / "gateway-responses.sqlite",
                                      settings.serving.response_cache,
                                      settings.serving.response_cache_bytes)
    app = Starlette(lifespan=_lifespan(settings, gateway, specs))
    app.state.gateway = gateway
    app.state.admin = AdminService(gateway, settings.serving.alias,
                                   lambda route: save_route(settings, route))
    attach_routes(app, SecretStr(admin_key(settings)))
    if settings.serving.cors_origins:  # off unless configured: see serving.cors_origins
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.serving.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", USER_HEADER],
            expose_headers=[VERSION_HEADER, RESPONSE_ID_HEADER, ALIAS_HEADER])
    return app


def _pool(settings: Settings, served_name: str, metrics: GatewayMetrics) -> ReplicaPool:
    """An empty pool: the lifespan adds the replicas."""
    cfg = settings.serving

    async def lookup(version: str) -> Adapter:
        return await asyncio.to_thread(read_adapter, settings, version)

    pool = ReplicaPool([], base_name=served_name, adapters_dir=settings.adapters_dir,
                       lookup=lookup, start_timeout_s=cfg.start_timeout_s,
                       health_interval_s=cfg.health_interval_s,
                       rollback_grace_s=cfg.rollback_grace_s,
                       bucket=settings.object_store.bucket)
    pool.on_restart = lambda r: metrics.replica_restarts.labels(str(r.index)).inc()

    async def previous(alias: str) -> list[str]:
        return await asyncio.to_thread(previous_productions, settings, alias)

    def routed_around(event: RoutedAround) -> None:
        metrics.routed_around.labels(event.alias, event.role).inc()
        save_route(settings, pool.routing.get(event.alias) or Route(event.alias, None))
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(
            record_routed_around, settings, event.alias, event.version, event.role,
            event.serving, event.why))
        _KEEP.add(task)
        task.add_done_callback(_KEEP.discard)

    pool.previous = previous
    pool.on_route_around = routed_around
    return pool


_KEEP: set[asyncio.Task[None]] = set()  # recording tasks, held until done


def _producers(settings: Settings) -> tuple[FeedbackProducer, FeedbackProducer]:
    """The feedback and shadow-pair producers, each with its own outbox."""
    home = Path(settings.home)
    feedback = FeedbackProducer(settings, background=True,
                                outbox_path=home / "gateway-outbox.sqlite")
    shadow = FeedbackProducer(settings, background=True, topic=settings.serving.shadow_topic,
                              outbox_path=home / "gateway-shadow-outbox.sqlite")
    return feedback, shadow


def _lifespan(settings: Settings, gateway: Gateway, specs: dict[int, ReplicaSpec]
              ) -> Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]:
    """Start (or adopt) the replicas and supervise them while the app serves."""
    cfg, pool = settings.serving, gateway.pool

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Every call to a replica carries its key: without it vLLM refuses its /v1 routes.
        key = await asyncio.to_thread(vllm_key, settings)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S),
            auto_decompress=False, headers={"Authorization": f"Bearer {key}"})
        gateway.session = session
        for i, url in enumerate(cfg.upstream_urls()):
            spec = specs.get(i)
            pool.replicas.append(Replica(i, ReplicaClient(url, session), spec))
            if spec is not None:
                pid = await asyncio.to_thread(spec.start)
                log.info("replica %d: vLLM pid %d at %s", i, pid, url)
        route = await asyncio.to_thread(initial_route, settings)
        pool.routing = RoutingTable().with_route(route)
        await asyncio.to_thread(_record_start_difference, settings, route)
        log.info("gateway on %s: %s -> production %s, candidate %s", cfg.gateway_url,
                 route.alias, route.production or "base", route.candidate or "-")
        loop = asyncio.get_running_loop()
        supervisor = loop.create_task(pool.supervise())
        reconciler = loop.create_task(reconcile_forever(
            settings, pool, lambda r: save_route(settings, r)))
        resumer = loop.create_task(gateway.resume_shadows(cfg.start_timeout_s))
        try:
            yield
        finally:
            for task in (supervisor, reconciler, resumer):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await gateway.drain()
            await session.close()
            for producer in (gateway.feedback_producer, gateway.shadow_producer):
                if producer is not None:
                    await asyncio.to_thread(producer.close, 5.0)
            if gateway.responses is not None:
                gateway.responses.close()

    return lifespan


def run_gateway(settings: Settings, model_path: str, served_name: str) -> None:
    """Serve until stopped (``tuneloop gateway``, started by ``tuneloop up``)."""
    app = create_app(settings, model_path, served_name)
    uvicorn.run(app, host=settings.serving.host, port=settings.serving.gateway_port,
                log_level="warning", access_log=False, timeout_graceful_shutdown=10)
