"""The registry is the source of truth for what the gateway serves.

A promotion flips the gateway first and commits to the registry second; a process killed
between the two leaves the gateway serving a version the registry calls a candidate (or
the other way round). The gateway reconciles on start (its route is built from the
registry; a difference from what it served before is recorded) and every
``serving.reconcile_s``: a route that differs from the registry's is swapped to it and
the change recorded as a ``serving`` decision. A route set in the last interval is left
alone (a promotion may be between its flip and its commit), and so is a version the pool
routes around because it cannot load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from tuneloop.runtime.settings import Settings
from tuneloop.serving.control import record_reconciled, registry_route
from tuneloop.serving.pool import NoReplicaError, ReplicaPool, RouteChangedError, SwapError
from tuneloop.serving.routing import Route

log = logging.getLogger(__name__)


def differs(route: Route, production: str | None, canary: str | None,
            unloadable: set[str]) -> bool:
    """Whether ``route`` must change to serve ``production`` and ``canary``, leaving aside
    versions known not to load. Pure."""
    want_production = route.production if production in unloadable else production
    want_canary = None if canary in unloadable else canary
    return (route.production, route.candidate) != (want_production, want_canary)


async def reconcile_once(settings: Settings, pool: ReplicaPool,
                         save: Callable[[Route], None]) -> Route | None:
    """Swap the alias's route to the registry's when they differ (see the module
    docstring); returns the new route, or None when nothing changed."""
    alias, cfg = settings.serving.alias, settings.serving
    swapped = pool.last_swap_at.get(alias, float("-inf"))
    if time.monotonic() - swapped < cfg.reconcile_s:
        return None
    reg = await asyncio.to_thread(registry_route, settings, alias)
    if pool.last_swap_at.get(alias, float("-inf")) != swapped:
        # A promotion swapped while the registry was read: its record may not be
        # committed yet, so what was read says nothing about it. The next round looks.
        return None
    route = pool.routing.get(alias) or Route(alias, None)
    unloadable = {v for (a, v) in pool.errors if a == alias}
    if not differs(route, reg.production, reg.canary, unloadable):
        return None
    target = replace(
        route, production=route.production if reg.production in unloadable else reg.production,
        candidate=None if reg.canary in unloadable else reg.canary,
        canary_share=route.canary_share if reg.canary == route.candidate else cfg.canary_share,
        shadow_share=route.shadow_share if reg.canary == route.candidate else cfg.shadow_share)
    try:
        await pool.set_route(target, expect=route)
    except RouteChangedError:
        log.info("reconcile %s: its route changed meanwhile; the next round looks again", alias)
        return None
    except (SwapError, NoReplicaError) as exc:
        log.warning("reconcile %s with the registry: the swap failed (%s); next try in %.0fs",
                    alias, exc, cfg.reconcile_s)
        return None
    save(target)
    await asyncio.to_thread(record_reconciled, settings, alias, route, target, "on schedule")
    return target


async def reconcile_forever(settings: Settings, pool: ReplicaPool,
                            save: Callable[[Route], None]) -> None:
    """Run :func:`reconcile_once` every ``serving.reconcile_s`` (0: never)."""
    interval = settings.serving.reconcile_s
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            await reconcile_once(settings, pool, save)
        except Exception:  # a busy store, say: the next round tries again
            log.exception("reconcile with the registry failed; trying again in %.0fs", interval)
