"""The serving layer seen from outside the gateway: its key, its routing in the registry,
and the admin client the CLI and flows use to swap adapters.

The registry is the source of truth. A promotion is: load and probe the version on
every replica, flip the alias (both done by the gateway's ``/admin/route``), then
record the move in the registry; if the record fails, the gateway is flipped back.
A gateway that starts (or restarts) builds its routing from the registry.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tuneloop.runtime.keys import key_file
from tuneloop.runtime.settings import Settings
from tuneloop.services.registry import store as registry
from tuneloop.services.registry.core import Adapter, RegistryError, Transition, plan_promotion
from tuneloop.services.registry.remote import RemoteAdapters, local_files
from tuneloop.services.store.database import Store

log = logging.getLogger(__name__)


# How long GatewayAdmin.running() waits for the gateway's answer: a loaded 2-core machine
# once kept the gateway's answer to GET /v1/models past 2 s.
RUNNING_PROBE_S = 15.0


class GatewayError(RuntimeError):
    """The gateway refused or failed an admin call; ``status`` is its HTTP status (0: down)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def admin_key(settings: Settings) -> str:
    """``serving.admin_key``, else the key in ``<home>/gateway.key`` (created, mode 0600).

    The one place the key's value is read: settings keep it as a secret that never
    prints. Raises ``OSError`` when the key file cannot be read or created.
    """
    if settings.serving.admin_key is not None and settings.serving.admin_key.get_secret_value():
        return settings.serving.admin_key.get_secret_value()
    return key_file(Path(settings.home) / "gateway.key")


def user_id_key(settings: Settings) -> bytes:
    """The key of the keyed hash that stands for a user in feedback (``serving.user_id_key``,
    else the key in ``<home>/user-id.key``, created, mode 0600): without it a user id
    cannot be traced back to the ``user`` a client sent, an e-mail address say.
    Raises ``OSError`` when the key file cannot be read or created."""
    configured = settings.serving.user_id_key
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value().encode()
    return key_file(Path(settings.home) / "user-id.key").encode()


def event_key(settings: Settings) -> bytes:
    """The key of the gateway's event signatures (``serving.event_key``, else the key in
    ``<home>/event.key``, created, mode 0600); see :mod:`tuneloop.services.feedback.signing`.
    Raises ``OSError`` when the key file cannot be read or created."""
    configured = settings.serving.event_key
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value().encode()
    return key_file(Path(settings.home) / "event.key").encode()


@dataclass(frozen=True)
class RegistryRoute:
    """What the registry says an alias serves."""

    production: str | None
    canary: str | None


def registry_route(settings: Settings, alias: str) -> RegistryRoute:
    """The production and canary versions of ``alias`` (None: the base model / no canary)."""
    store = Store.of(settings)
    with store.connect() as con:
        production = registry.production(con, alias)
        canary = registry.canary(con, alias)
    return RegistryRoute(production.version if production else None,
                         canary.version if canary else None)


def previous_productions(settings: Settings, alias: str) -> list[str]:
    """The versions of ``alias`` that were production, most recently promoted first."""
    with Store.of(settings).connect() as con:
        rows = con.execute(
            "SELECT d.adapter_version, max(d.occurred_at) AS promoted_at FROM deployments d "
            "JOIN adapters a ON a.version = d.adapter_version WHERE a.alias = ? AND "
            "d.to_state = 'production' GROUP BY d.adapter_version ORDER BY promoted_at DESC",
            [alias]).fetchall()
    return [str(v) for v, _ in rows]


def record_routed_around(settings: Settings, alias: str, version: str, role: str,
                         serving: str | None, why: str) -> None:
    """Record that the gateway serves ``alias`` around ``version``, which cannot load: a
    decision of stage ``serving`` in the decision log (and the loop's metrics)."""
    from tuneloop.services.canary.core import FAIL, Check, Decision
    from tuneloop.services.canary.records import record

    verdict = "off-route" if role == "candidate" else "fallback"
    record(Store.of(settings), Path(settings.home), Decision(
        "serving", version if role == "candidate" else None, serving, verdict,
        [Check("loads", FAIL, None, None, "", f"{alias} {role} {version} cannot load: {why}")],
        {"alias": alias, "role": role, "version": version, "serving": serving}))


def record_reconciled(settings: Settings, alias: str, was: Any, now: Any, when: str) -> None:
    """Record that the gateway's route of ``alias`` was changed from ``was`` to ``now`` (each
    with ``production`` and ``candidate``) to match the registry: a ``serving`` decision."""
    from tuneloop.services.canary.core import INFO, Check, Decision
    from tuneloop.services.canary.records import record

    def show(route: Any) -> str:
        return f"production {route.production or 'base'}, canary {route.candidate or '-'}"

    record(Store.of(settings), Path(settings.home), Decision(
        "serving", now.candidate, now.production, "reconciled",
        [Check("registry", INFO, None, None, "",
               f"{alias} served {show(was)}; the registry says {show(now)} ({when})")],
        {"alias": alias, "was": {"production": was.production, "candidate": was.candidate},
         "now": {"production": now.production, "candidate": now.candidate}}))


def read_adapter(settings: Settings, version: str) -> Adapter:
    """One registry row; raises ``LookupError`` when there is none."""
    store = Store.of(settings)
    try:
        with store.connect() as con:
            return registry.get_adapter(con, version)
    except RegistryError as exc:
        raise LookupError(str(exc)) from None


def saved_shares(settings: Settings) -> dict[str, Any]:
    """The shares the gateway last applied (``<home>/serving/routing.json``), if any."""
    try:
        return dict(json.loads(routing_file(settings).read_text()))
    except (FileNotFoundError, ValueError):
        return {}


def routing_file(settings: Settings) -> Path:
    """Where the gateway keeps the shares it last applied."""
    return Path(settings.home) / "serving" / "routing.json"


class GatewayAdmin:
    """The gateway's admin routes, for the CLI and the flows. Every call raises
    :class:`GatewayError`: ``status`` 0 when the gateway is unreachable, else its HTTP
    status (401 wrong key, 4xx a refused request, 5xx a failed swap)."""

    def __init__(self, settings: Settings, timeout_s: float = 600.0) -> None:
        self.url = settings.serving.gateway_url
        self._headers = {"Authorization": f"Bearer {admin_key(settings)}"}
        self._timeout = timeout_s

    def state(self) -> dict[str, Any]:
        """Routes, replicas, adapters in their grace period and load errors."""
        return self._call("GET", "/admin/state")

    def set_route(self, **fields: Any) -> dict[str, Any]:
        """Change an alias's routing (production, candidate, canary_share, shadow_share)."""
        return self._call("POST", "/admin/route", fields)

    def load(self, version: str) -> dict[str, Any]:
        """Load and probe ``version`` on every replica without routing to it."""
        return self._call("POST", "/admin/load", {"version": version})

    def unload(self, version: str) -> dict[str, Any]:
        """Drop ``version`` from every replica (refused while a route uses it)."""
        return self._call("POST", "/admin/unload", {"version": version})

    def observations(self, alias: str, since: float, until: float | None = None) -> dict[str, Any]:
        """Requests, errors and latencies per version of ``alias`` between ``since`` and
        ``until`` (epoch seconds; None: now)."""
        query = f"alias={alias}&since={since}" + ("" if until is None else f"&until={until}")
        return self._call("GET", f"/admin/observations?{query}")

    def running(self) -> bool:
        """Whether the gateway answers at all (any status) within ``RUNNING_PROBE_S``. The
        probe is long enough for a gateway slowed by a loaded machine: one taken for absent
        leaves a promotion recorded but not routed until the gateway's reconcile, at the
        gateway's own shares. A gateway that does not answer in that time is left to the
        reconcile, as one that is down."""
        try:
            httpx.get(f"{self.url}/v1/models", timeout=httpx.Timeout(RUNNING_PROBE_S, connect=2))
            return True
        except httpx.HTTPError:
            return False

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            resp = httpx.request(method, self.url + path, json=body, headers=self._headers,
                                 timeout=self._timeout)
        except httpx.HTTPError as exc:
            raise GatewayError(0, f"gateway at {self.url} unreachable: {exc}") from None
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:300]
            raise GatewayError(resp.status_code, message)
        return dict(resp.json())


# ------------------------------------------------------------------ registry + gateway together
def promote(settings: Settings, version: str, to_state: str, reason: str) -> list[Transition]:
    """Put ``version`` into 'canary' or 'production': swap on the gateway, then record it.

    With no gateway running, only the registry changes; a gateway that starts later
    serves what the registry says. Raises ``RegistryError`` (nothing changed) or
    :class:`GatewayError` (the swap failed; production keeps serving, nothing recorded).
    """
    store = Store.of(settings)
    with store.connect() as con:
        adapter = registry.get_adapter(con, version)
        local_files(adapter, settings)  # raises unless its files verify
        states = {a.version: a.state for a in registry.list_adapters(con, adapter.alias)}
        plan_promotion(states, version, to_state)  # raises before anything moves
    change: dict[str, Any] = {"production": version} if to_state == "production" else \
        {"candidate": version, "canary_share": settings.serving.canary_share,
         "shadow_share": settings.serving.shadow_share}
    if to_state == "production" and states.get(version) == "canary":
        change["candidate"] = None
    plan = _swap_then_record(settings, change,
                             lambda con: registry.promote(con, version, to_state, reason))
    if to_state == "production" and settings.store.artifacts:
        collect_adapters(settings)
    return plan


def collect_adapters(settings: Settings) -> list[Adapter]:
    """Delete the object-stored files no alias can go back to (``store.keep_retired``;
    see :func:`~tuneloop.services.registry.store.collect`), after each promotion to
    production. A failure is logged, never raised: the promotion stands, and the next
    one collects what this one left."""
    try:
        with Store.of(settings).connect() as con:
            return registry.collect(con, RemoteAdapters.of(settings),
                                    settings.store.keep_retired)
    except Exception as exc:  # noqa: BLE001 - the object store or the store is down
        log.warning("collecting retired adapters failed (%s); the next promotion retries", exc)
        return []


def rollback(settings: Settings, reason: str, to_version: str | None = None) -> list[Transition]:
    """Reject production and restore the previous version (or the base model), swap first."""
    alias = settings.serving.alias
    store = Store.of(settings)
    with store.connect() as con:
        plan = registry.rollback_plan(con, alias, to_version)
        restored = next((t.version for t in plan if t.to_state == "production"), None)
        if restored is not None:  # raises unless its files are there and verify
            local_files(registry.get_adapter(con, restored), settings)
    return _swap_then_record(settings, {"production": restored},
                             lambda con: registry.rollback(con, alias, reason, to_version))


def reject(settings: Settings, version: str, reason: str) -> list[Transition]:
    """Reject ``version``; if it is the canary, it stops taking traffic first."""
    route = registry_route(settings, settings.serving.alias)
    change: dict[str, Any] = {"candidate": None} if route.canary == version else {}
    if route.production == version:
        raise RegistryError(f"{version} is in production: roll it back instead")
    return _swap_then_record(settings, change, lambda con: registry.reject(con, version, reason))


def _swap_then_record(settings: Settings, change: dict[str, Any],
                      record: Any) -> list[Transition]:
    admin = GatewayAdmin(settings)
    before: dict[str, Any] | None = None
    if change and admin.running():
        routes = admin.state()["routes"]
        current = next((r for r in routes if r["alias"] == settings.serving.alias), None)
        if current is not None:
            before = {"production": current["production"], "candidate": current["candidate"]}
        admin.set_route(**change)  # load + probe on every replica, then the flip
    store = Store.of(settings)
    try:
        with store.connect() as con:
            plan: list[Transition] = record(con)
    except BaseException:
        if before is not None:
            log.error("recording the change failed; the gateway goes back to %s", before)
            admin.set_route(**before)
        raise
    return plan
