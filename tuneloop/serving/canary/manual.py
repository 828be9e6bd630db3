"""``tuneloop canary rollback``: a person takes the canary, or production, off traffic."""

from __future__ import annotations

from dataclasses import dataclass

from tuneloop.runtime.settings import Settings
from tuneloop.services.canary.core import Decision
from tuneloop.services.canary.records import Recorded, record
from tuneloop.services.registry.core import Transition
from tuneloop.services.store.database import Store
from tuneloop.serving import control


@dataclass(frozen=True)
class ManualRollback:
    """What a manual rollback moved, and its decision as recorded."""

    transitions: list[Transition]
    decision: Decision
    recorded: Recorded


def rollback_by_hand(settings: Settings, reason: str, to: str | None = None) -> ManualRollback:
    """Take the live canary off traffic; with none (or with ``to``), roll production back
    to the last retired version (or ``to``; the base model when there is none).

    The decision is recorded like the canary flow's own (stage ``manual``, verdict
    ``rollback``): in ``canary_decisions`` and the loop's counters. Raises
    ``RegistryError`` (nothing changed) or :class:`tuneloop.serving.control.GatewayError`
    (the swap failed; nothing recorded).
    """
    route = control.registry_route(settings, settings.serving.alias)
    why = f"manual rollback: {reason}"
    candidate: str | None
    if route.canary is not None and to is None:
        moved = control.reject(settings, route.canary, why)
        candidate, incumbent = route.canary, route.production
    else:
        moved = control.rollback(settings, why, to)
        candidate = route.production
        incumbent = next((t.version for t in moved if t.to_state == "production"), None)
    decision = Decision("manual", candidate, incumbent, "rollback", figures={"reason": reason})
    recorded = record(Store.of(settings), settings.home,
                      decision)
    return ManualRollback(moved, decision, recorded)
