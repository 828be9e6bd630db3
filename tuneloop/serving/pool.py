"""The replicas behind the gateway: readiness, adapter loads, versioned hot-swap.

A replica is *ready* when vLLM answers its health check and every adapter version
the routing table can send traffic to is loaded on it. Only ready replicas get
requests. The supervisor loop (:meth:`ReplicaPool.supervise`) restarts a managed
replica whose process died, and after any restart loads the routed adapters again
before the replica takes traffic (runtime loads do not survive a restart).

A swap (:meth:`ReplicaPool.set_route`) verifies each new version against its
manifest, loads it on every replica that is up and probes it with one token, and
only then replaces the routing table in a single assignment. A failure at any step
unloads what this attempt loaded and leaves the old route serving. The production
version a swap replaces stays loaded for ``rollback_grace_s``, so a rollback is a
flip, not a load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from tuneloop.services.registry.artifacts import verify_adapter
from tuneloop.services.registry.core import Adapter, IntegrityError
from tuneloop.services.registry.remote import PREFIX, is_remote, lora_uri
from tuneloop.serving.routing import Route, RoutingTable, upstream_name
from tuneloop.serving.upstream import ReplicaClient, UpstreamError
from tuneloop.serving.vllm_process import ReplicaSpec

log = logging.getLogger(__name__)

# Health checks that fail in a row before a replica whose process lives is taken out
# (a loaded CPU can make one check slow); a dead process is taken out at once.
_FAILS_BEFORE_DOWN = 3
# A replica that ran this long before it died is restarted at once; sooner, with backoff.
_STABLE_S = 600.0
_MAX_BACKOFF_S = 60.0


def restart_due(quick_deaths: int, since_start: float) -> tuple[bool, int]:
    """For a replica found dead ``since_start`` seconds after its last start, having died
    ``quick_deaths`` times in a row soon after starting: whether to restart it now, and
    its count of quick deaths from then on. One that ran for ``_STABLE_S`` is restarted
    at once; one that keeps dying soon after each start waits 2, 4, 8 ... up to 60 s from
    its last start, so bad flags or an engine that crashes once loaded are not restarted
    in a loop. Pure."""
    if since_start > _STABLE_S:
        quick_deaths = 0
    backoff = min(_MAX_BACKOFF_S, 2.0 ** min(quick_deaths, 6)) if quick_deaths else 0.0
    if since_start <= backoff:
        return False, quick_deaths
    return True, quick_deaths + 1 if since_start <= _STABLE_S else quick_deaths


class SwapError(Exception):
    """A version could not be made ready on every replica; the old route still serves.

    ``client_error`` is true when the adapter or the request is at fault (tampered
    files, a path outside the registry, vLLM's 4xx), false when the engine refused.
    """

    def __init__(self, message: str, client_error: bool) -> None:
        super().__init__(message)
        self.client_error = client_error


class RouteChangedError(SwapError):
    """A swap decided on an alias's route as it was read earlier: the route changed since."""

    def __init__(self, message: str) -> None:
        super().__init__(message, client_error=False)


class NoReplicaError(Exception):
    """No replica can serve right now (starting, restarting, or loading adapters)."""


@dataclass
class Replica:
    """What the gateway knows of one vLLM replica."""

    index: int
    client: ReplicaClient
    spec: ReplicaSpec | None = None
    state: str = "starting"  # starting | syncing | ready | down
    loaded: dict[str, str | None] = field(default_factory=dict)
    inflight: int = 0
    using: dict[str, int] = field(default_factory=dict)  # requests in flight per served name
    restarts: int = 0
    quick_deaths: int = 0  # deaths in a row, each within _STABLE_S of its start
    unowned: bool = False  # it answers, but its recorded process is not found
    failures: int = 0
    started_at: float = field(default_factory=time.monotonic)
    last_error: str = ""
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # Names whose files this gateway verified (it loaded them, or checked what it adopted).
    verified: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return self.client.url

    def lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())


AdapterLookup = Callable[[str], Awaitable[Adapter]]


@dataclass(frozen=True)
class RoutedAround:
    """A version that could not load, and what its alias serves instead."""

    alias: str
    version: str
    role: str  # "candidate" or "production"
    serving: str | None  # the production version now served (None: the base model)
    why: str

    def summary(self) -> str:
        if self.role == "candidate":
            return f"candidate {self.version} taken off {self.alias}'s route; production serves all"
        return (f"production {self.version} of {self.alias} cannot load; serving "
                f"{self.serving or 'the base model'} instead")


@dataclass
class SwapTimings:
    verify_s: float = 0.0
    load_s: float = 0.0
    probe_s: float = 0.0
    flip_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.verify_s + self.load_s + self.probe_s + self.flip_s


class ReplicaPool:
    """Replicas, the routing table, and the only code that changes either."""

    def __init__(self, replicas: list[Replica], *, base_name: str, adapters_dir: Path,
                 lookup: AdapterLookup, start_timeout_s: float, health_interval_s: float,
                 rollback_grace_s: float, bucket: str | None = None) -> None:
        self.replicas = replicas
        self.bucket = bucket  # object-stored adapters (store.artifacts) load from here only
        self.base_name = base_name
        self.adapters_dir = Path(adapters_dir).resolve()
        self.lookup = lookup
        self.start_timeout_s = start_timeout_s
        self.health_interval_s = health_interval_s
        self.rollback_grace_s = rollback_grace_s
        self.routing = RoutingTable()
        self.grace: dict[tuple[str, str], float] = {}  # (alias, version) -> unload after
        self.errors: dict[tuple[str, str], str] = {}  # (alias, version) -> why it cannot load
        self._swap_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self.on_restart: Callable[[Replica], None] | None = None
        # Earlier production versions of an alias, newest first (the registry's history):
        # where production falls back to when its version cannot load.
        self.previous: Callable[[str], Awaitable[list[str]]] | None = None
        # Told of each route changed around a version that cannot load (to save and record it).
        self.on_route_around: Callable[[RoutedAround], None] | None = None
        self.degraded: dict[str, RoutedAround] = {}  # alias -> why it serves what it does
        self.last_swap_at: dict[str, float] = {}  # alias -> monotonic time of its last flip

    # ------------------------------------------------------------ data plane
    def pick(self, name: str) -> Replica:
        """The ready replica with ``name`` loaded and the fewest requests in flight."""
        best: Replica | None = None
        for r in self.replicas:
            serves = r.state == "ready" and (name == self.base_name or name in r.loaded)
            if serves and (best is None or r.inflight < best.inflight):
                best = r
        if best is None:
            states = ", ".join(f"replica {r.index} {r.state}" for r in self.replicas)
            raise NoReplicaError(f"no replica can serve {name} right now ({states})")
        return best

    @staticmethod
    def acquire(replica: Replica, name: str) -> None:
        """Count a request to ``name`` on ``replica`` (call right after :meth:`pick`, no await
        between), so the name is not unloaded under it."""
        replica.inflight += 1
        replica.using[name] = replica.using.get(name, 0) + 1

    @staticmethod
    def release(replica: Replica, name: str) -> None:
        replica.inflight -= 1
        left = replica.using.get(name, 1) - 1
        if left:
            replica.using[name] = left
        else:
            replica.using.pop(name, None)

    def in_use(self, name: str) -> bool:
        return any(r.using.get(name) for r in self.replicas)

    def report_failure(self, replica: Replica, error: str) -> None:
        """A request could not reach ``replica``: stop routing to it until it is checked."""
        if replica.state == "ready":
            log.warning("replica %d (%s) unreachable, taken out of rotation: %s",
                        replica.index, replica.url, error)
            replica.state = "down"
            replica.last_error = error
        self._wake.set()

    def ready(self) -> bool:
        return any(r.state == "ready" for r in self.replicas)

    # ------------------------------------------------------------ swaps
    async def set_route(self, route: Route, expect: Route | None = None) -> SwapTimings:
        """Make every version of ``route`` ready on every live replica, then flip to it.
        With ``expect``, only if the alias's route is still that one when the swap's turn
        comes (a change decided on what was read earlier never undoes a newer one).

        Raises :class:`SwapError` (old route untouched; :class:`RouteChangedError` when
        ``expect`` is no longer the route) or :class:`NoReplicaError`.
        """
        async with self._swap_lock:
            timings = SwapTimings()
            previous = self.routing.get(route.alias)
            if expect is not None and (previous or Route(route.alias, None)) != expect:
                raise RouteChangedError(f"the route of {route.alias} changed meanwhile; "
                                        "not swapped")
            for version in sorted(route.versions()):
                await self._prepare(route.alias, version, timings)
            started = time.perf_counter()
            self.routing = self.routing.with_route(route)  # the flip: one assignment
            timings.flip_s = time.perf_counter() - started
            self.degraded.pop(route.alias, None)  # every version of the new route loaded
            self.last_swap_at[route.alias] = time.monotonic()
            now = time.monotonic()
            if previous is not None:
                for version in previous.versions() - route.versions():
                    self.grace[(route.alias, version)] = now + self.rollback_grace_s
            for version in route.versions():
                self.grace.pop((route.alias, version), None)
            log.info("route %s: production %s, candidate %s (canary %.0f%%, shadow %.0f%%); swap %.2fs",
                     route.alias, route.production or "base", route.candidate or "-",
                     100 * route.canary_share, 100 * route.shadow_share, timings.total_s)
        self._wake.set()
        return timings

    async def preload(self, alias: str, version: str) -> SwapTimings:
        """Load and probe ``version`` everywhere without routing to it."""
        async with self._swap_lock:
            timings = SwapTimings()
            await self._prepare(alias, version, timings)
            self.grace[(alias, version)] = time.monotonic() + self.rollback_grace_s
            return timings

    async def unload(self, alias: str, version: str) -> None:
        """Drop ``version`` from every replica (refused while a route uses it)."""
        async with self._swap_lock:
            if (alias, version) in self.routing.versions():
                raise SwapError(f"{alias} still routes to {version}; change the route first",
                                client_error=True)
            self.grace.pop((alias, version), None)
            name = upstream_name(alias, version, self.base_name)
            # Requests routed before the last flip may still be on their way to vLLM.
            deadline = time.monotonic() + 60
            while self.in_use(name) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await self._unload_everywhere(name)

    async def _prepare(self, alias: str, version: str, timings: SwapTimings) -> None:
        name = upstream_name(alias, version, self.base_name)
        live = [r for r in self.replicas if r.state in ("ready", "syncing")]
        if not live:
            raise NoReplicaError(f"no replica is up to load {name}; try again when one is")
        started = time.perf_counter()
        path = await self._verified_path(alias, version)
        timings.verify_s += time.perf_counter() - started
        loaded_here: list[Replica] = []
        try:
            results = await asyncio.gather(
                *(self._ensure_loaded(r, name, path, timings) for r in live),
                return_exceptions=True)
            for replica, result in zip(live, results, strict=True):
                if result is True:
                    loaded_here.append(replica)
            failures = [(r, e) for r, e in zip(live, results, strict=True)
                        if isinstance(e, BaseException)]
            if failures:
                replica, exc = failures[0]
                client = isinstance(exc, UpstreamError) and exc.client_error
                raise SwapError(f"{name} failed on replica {replica.index}: {exc}",
                                client_error=client) from exc
        except BaseException:
            await asyncio.gather(*(self._unload_one(r, name) for r in loaded_here),
                                 return_exceptions=True)
            raise

    async def _verified_path(self, alias: str, version: str) -> str:
        try:
            adapter = await self.lookup(version)
        except LookupError as exc:
            raise SwapError(str(exc), client_error=True) from None
        if is_remote(adapter.path):
            # Each replica fetches the version by its manifest's checksum into a cache of
            # its own and verifies it there (tuneloop's vLLM plugin): no shared disk.
            if self.bucket is None or not adapter.path.startswith(f"s3://{self.bucket}/{PREFIX}"):
                raise SwapError(f"adapter {version} lives at {adapter.path}, outside "
                                f"s3://{self.bucket}/{PREFIX}; refusing to load it",
                                client_error=True)
            self.errors.pop((alias, version), None)
            return lora_uri(adapter)
        path = adapter.directory(self.adapters_dir)
        if not path.is_relative_to(self.adapters_dir):
            raise SwapError(f"adapter {version} lives at {path}, outside the registry's "
                            f"{self.adapters_dir}; refusing to load it", client_error=True)
        try:
            await asyncio.to_thread(verify_adapter, path, adapter.sha256)
        except IntegrityError as exc:
            self.errors[(alias, version)] = str(exc)
            raise SwapError(f"adapter {version} failed verification: {exc}",
                            client_error=True) from None
        self.errors.pop((alias, version), None)
        return str(path)

    async def _ensure_loaded(self, replica: Replica, name: str, path: str,
                             timings: SwapTimings) -> bool:
        """Load and probe ``name`` on ``replica``; True if this call loaded it."""
        async with replica.lock(name):
            if replica.loaded.get(name) == path and name in replica.verified:
                return False
            current = await replica.client.models()
            if name in current and current[name] == path:  # loaded from the verified files
                replica.loaded[name] = path
                replica.verified.add(name)
                return False
            if name in current:  # loaded from somewhere else: replace it
                await self._unload_one(replica, name)
            started = time.perf_counter()
            await replica.client.load(name, path)
            loaded = time.perf_counter()
            try:
                await replica.client.probe(name)
            except BaseException:
                await self._unload_one(replica, name)
                raise
            timings.load_s = max(timings.load_s, loaded - started)
            timings.probe_s = max(timings.probe_s, time.perf_counter() - loaded)
            replica.loaded[name] = path
            replica.verified.add(name)
            log.info("replica %d: loaded and probed %s from %s (%.2fs)", replica.index, name,
                     path, time.perf_counter() - started)
            return True

    async def _check_adopted(self, replica: Replica, name: str, alias: str, version: str) -> None:
        """A name the replica had loaded before this gateway saw it (adopted after a
        restart, or loaded by someone else): route to it only when it was loaded from the
        registry's directory of that version and those files verify; else unload it, so
        the verified files are loaded in its place."""
        try:
            path = await self._verified_path(alias, version)
        except SwapError as exc:
            log.warning("replica %d: %s is loaded but its registry files fail (%s); unloading",
                        replica.index, name, exc)
            await self._unload_one(replica, name)
            return
        if replica.loaded.get(name) != path:
            log.warning("replica %d: %s was loaded from %s, not from the registry's %s; "
                        "reloading it", replica.index, name, replica.loaded.get(name), path)
            await self._unload_one(replica, name)
            return
        replica.verified.add(name)

    async def _unload_one(self, replica: Replica, name: str) -> None:
        try:
            await replica.client.unload(name)
        except UpstreamError as exc:
            log.warning("replica %d: unload %s: %s", replica.index, name, exc)
        replica.loaded.pop(name, None)

    async def _unload_everywhere(self, name: str) -> None:
        await asyncio.gather(*(self._unload_one(r, name) for r in self.replicas
                               if r.state != "down"), return_exceptions=True)

    # ------------------------------------------------------------ supervision
    async def supervise(self) -> None:
        """Run forever: check each replica, restart, resync adapters, expire graced versions."""
        while True:
            await asyncio.gather(*(self._check(r) for r in self.replicas), return_exceptions=True)
            await self._expire_grace()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.health_interval_s)

    async def _check(self, replica: Replica) -> None:
        spec = replica.spec
        # The process first: one killed while its health check is in flight is gone.
        alive = spec is None or spec.alive()
        healthy = await replica.client.healthy()
        if spec is not None and not alive:
            if healthy:
                # Its recorded process is not found, yet a vLLM answers on its port: a second
                # one started there could not bind it and would die, again and again, each
                # try taking the replica out of rotation. It serves on.
                if not replica.unowned:
                    log.warning("replica %d: its recorded process (%s) is not found, yet %s "
                                "answers; serving on, not starting a second vLLM on its port",
                                replica.index, spec.process.pid_file, replica.url)
                replica.unowned = True
            else:
                replica.failures += 1
                if replica.unowned and replica.failures < _FAILS_BEFORE_DOWN:
                    return  # one missed check of a vLLM that answered before: look again
                # Gone: restart it, backing off while it keeps dying soon after each start
                # (bad flags, no memory, an engine that crashes once loaded), so it is not
                # restarted in a loop. One that served for a while is restarted at once.
                replica.unowned = False
                now, replica.quick_deaths = restart_due(replica.quick_deaths,
                                                        time.monotonic() - replica.started_at)
                if now:
                    self._restart(replica, "its process is gone")
                return
        else:
            replica.unowned = False
        if not healthy:
            replica.failures += 1
            if replica.state == "starting":
                if spec is not None and time.monotonic() - replica.started_at > self.start_timeout_s:
                    spec.process.stop(timeout_s=5)
                    self._restart(replica, f"not healthy after {self.start_timeout_s:.0f}s")
                return
            if replica.failures >= _FAILS_BEFORE_DOWN and replica.state != "down":
                log.warning("replica %d (%s) failed %d health checks; out of rotation",
                            replica.index, replica.url, replica.failures)
                replica.state = "down"
            return
        replica.failures = 0
        await self._sync(replica)

    def _restart(self, replica: Replica, why: str) -> None:
        assert replica.spec is not None
        log.warning("replica %d: %s; restarting vLLM", replica.index, why)
        replica.state = "starting"
        replica.loaded.clear()
        replica.verified.clear()
        replica.locks.clear()
        replica.restarts += 1
        replica.started_at = time.monotonic()
        replica.spec.start()
        if self.on_restart is not None:
            self.on_restart(replica)

    async def _sync(self, replica: Replica) -> None:
        """Match what the replica really has loaded; load what the routes need; mark ready."""
        try:
            current = await replica.client.models()
        except UpstreamError as exc:
            replica.last_error = str(exc)
            return
        replica.loaded = {n: p for n, p in current.items() if n != self.base_name}
        replica.verified &= set(replica.loaded)
        needed = {upstream_name(a, v, self.base_name): (a, v) for a, v in self.routing.versions()}
        for name in [n for n in needed if n in replica.loaded and n not in replica.verified]:
            await self._check_adopted(replica, name, *needed[name])
        missing = [n for n in needed if n not in replica.loaded]
        if missing:
            was = replica.state
            if replica.state != "ready":
                replica.state = "syncing"
            for name in missing:
                alias, version = needed[name]
                try:
                    path = await self._verified_path(alias, version)
                    await self._ensure_loaded(replica, name, path, SwapTimings())
                except (SwapError, UpstreamError) as exc:
                    replica.last_error = str(exc)
                    log.error("replica %d: cannot load routed adapter %s: %s", replica.index,
                              name, exc)
                    # The version's own fault (files gone or altered, refused by vLLM): serve
                    # around it. Anything else (the engine busy) is retried as it was.
                    if exc.client_error and await self._route_around(alias, version, str(exc)):
                        return await self._sync(replica)
                    if was == "ready":
                        # It lost an adapter it served (an external restart): out of rotation.
                        replica.state = "syncing"
                    return
            if was != "ready":
                log.info("replica %d ready after loading %s", replica.index, ", ".join(missing))
        if replica.state != "ready":
            log.info("replica %d (%s) ready", replica.index, replica.url)
        replica.state = "ready"
        replica.last_error = ""

    async def _route_around(self, alias: str, version: str, why: str) -> bool:
        """Change ``alias``'s route so it no longer needs ``version``, which cannot load: a
        candidate leaves the route (production serves everyone), a production version
        gives way to the previous production version that is not known to fail, else to
        the base model. True when the route changed (or no longer held ``version``)."""
        async with self._swap_lock:
            route = self.routing.get(alias)
            if route is None or version not in route.versions():
                return True
            self.errors[(alias, version)] = why
            if version == route.candidate:
                new = replace(route, candidate=None, canary_share=0.0, shadow_share=0.0)
            else:
                try:
                    earlier = await self.previous(alias) if self.previous is not None else []
                except Exception:  # the registry unreadable now: the base model serves
                    log.exception("%s: the earlier production versions cannot be read", alias)
                    earlier = []
                fallback = next((v for v in earlier if v != version
                                 and (alias, v) not in self.errors), None)
                new = replace(route, production=fallback,
                              candidate=None if route.candidate == fallback else route.candidate)
            self.routing = self.routing.with_route(new)
        event = RoutedAround(alias, version, "candidate" if version == route.candidate
                             else "production", new.production, why)
        if event.role == "production" or alias not in self.degraded:
            self.degraded[alias] = event
        log.error("%s %s cannot load (%s): %s", alias, version, why, event.summary())
        if self.on_route_around is not None:
            self.on_route_around(event)
        return True

    async def _expire_grace(self) -> None:
        now = time.monotonic()
        for key, deadline in list(self.grace.items()):
            alias, version = key
            name = upstream_name(alias, version, self.base_name)
            # A request routed before the flip may still be on its way: unload after it.
            if deadline <= now and key not in self.routing.versions() and not self.in_use(name):
                self.grace.pop(key, None)
                log.info("unloading %s %s: its rollback grace period ended", alias, version)
                await self._unload_everywhere(name)
