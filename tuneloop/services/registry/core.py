"""The registry's rules, pure: adapter states, the moves between them, version names.

States and the moves between them (every move is a row in ``deployments``):

    candidate -> canary -> production -> retired -> production (rollback / re-promote)
        \\-> production   \\-> rejected    \\-> rejected (rollback)
         \\-> rejected

Each alias has its own production, canary and candidates; version numbers (``v1``,
``v2``, ...) are shared by every alias and never reused, and an adapter's name in vLLM
is ``<alias>-v<N>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

STATES = ("candidate", "canary", "production", "retired", "rejected")
ALLOWED: dict[str, frozenset[str]] = {
    "candidate": frozenset({"canary", "production", "rejected"}),
    "canary": frozenset({"production", "rejected"}),
    "production": frozenset({"retired", "rejected"}),
    "retired": frozenset({"production"}),
    "rejected": frozenset(),
}
_VERSION = re.compile(r"^v(\d+)$")

class RegistryError(ValueError):
    """A registry request that cannot be honoured; the message says why and what to do."""


class IntegrityError(RegistryError):
    """An adapter's files do not match its manifest (or are not safetensors)."""


class InvalidTransitionError(RegistryError):
    """A state change the lifecycle does not allow."""


@dataclass(frozen=True)
class Adapter:
    """One row of ``adapters``."""

    version: str
    name: str  # in vLLM and the gateway: ``<alias>-<version>``
    alias: str
    created_at: datetime
    base_model: str
    base_hash: str
    dataset_version: str | None
    path: str  # under the registry's root (``adapters_dir``: the home can move), or s3://
    sha256: str  # of manifest.json, which covers every other file
    metrics: dict[str, Any]
    state: str
    run_key: str | None

    def directory(self, adapters_dir: Path | str) -> Path:
        """Where the version's files are, under the registry root ``adapters_dir``."""
        return (Path(adapters_dir) / self.path).resolve()

    def where(self, adapters_dir: Path | str) -> str:
        """Where the version's files are, to show: its directory, or its s3:// URI."""
        return self.path if self.path.startswith("s3://") else str(self.directory(adapters_dir))


@dataclass(frozen=True)
class Transition:
    """One planned state change of one adapter."""

    version: str
    from_state: str
    to_state: str
    action: str


def check_transition(from_state: str, to_state: str) -> None:
    """Raise :class:`InvalidTransitionError` unless ``from_state -> to_state`` is allowed."""
    if to_state not in STATES:
        raise InvalidTransitionError(f"state {to_state!r} does not exist; use one of {STATES}")
    if to_state not in ALLOWED.get(from_state, frozenset()):
        allowed = sorted(ALLOWED.get(from_state, frozenset())) or "none (final state)"
        raise InvalidTransitionError(
            f"cannot move an adapter from {from_state!r} to {to_state!r}; from {from_state!r} "
            f"it may go to: {allowed}"
        )


def plan_promotion(states: Mapping[str, str], version: str, to_state: str) -> list[Transition]:
    """The transitions that put ``version`` into ``to_state`` ('canary' or 'production').

    ``states`` maps every version of one alias to its state. Promoting to production
    retires the current production adapter; only one canary may run at a time.
    """
    if version not in states:
        raise RegistryError(f"adapter {version!r} does not exist; see `tuneloop adapters list`")
    if to_state not in {"canary", "production"}:
        raise RegistryError(f"promote to {to_state!r}: use 'canary' or 'production'")
    current = states[version]
    if current == to_state:
        raise RegistryError(f"adapter {version} is already in {to_state}")
    check_transition(current, to_state)
    plan: list[Transition] = []
    holders = [v for v, s in states.items() if s == to_state]
    if to_state == "canary" and holders:
        raise RegistryError(
            f"adapter {holders[0]} is already the canary; promote or reject it first"
        )
    for holder in holders:
        plan.append(Transition(holder, "production", "retired", "retire"))
    plan.append(Transition(version, current, to_state, "promote"))
    return plan


def plan_rollback(
    states: Mapping[str, str], retired_order: Iterable[str], to_version: str | None = None
) -> list[Transition]:
    """Reject the production adapter and restore ``to_version`` (default: the last retired).

    ``states`` maps every version of one alias to its state.
    ``retired_order`` lists retired versions, most recently retired first. With no
    retired adapter, the alias falls back to the base model.
    """
    production = [v for v, s in states.items() if s == "production"]
    if not production:
        raise RegistryError("no adapter is in production; nothing to roll back")
    plan = [Transition(production[0], "production", "rejected", "rollback")]
    target = to_version or next(iter(retired_order), None)
    if target is not None:
        if states.get(target) != "retired":
            raise RegistryError(
                f"cannot roll back to {target!r}: it is {states.get(target, 'unknown')!r}, "
                "not 'retired'"
            )
        plan.append(Transition(target, "retired", "production", "rollback"))
    return plan


def next_version(existing: Iterable[str]) -> str:
    """The first version number above every one ever used (``v1`` for none)."""
    numbers = [int(m.group(1)) for v in existing if (m := _VERSION.match(v))]
    return f"v{max(numbers, default=0) + 1}"


def vllm_name(alias: str, version: str) -> str:
    """The adapter's name in vLLM and the gateway, e.g. ``support-bot-v7``."""
    return f"{alias}-{version}"

