"""Which adapter version answers a request: the pure routing core of the gateway.

An alias (``support-bot``) routes to its production version, or, for a share of
users, to the candidate under canary. The split is sticky: a user's bucket is a hash
of the user and the candidate version, so the same user always lands on the same
side of one canary, and each new canary draws a fresh sample of users. A route is
immutable; the gateway replaces its whole table in one assignment, so a request
sees the routing before a swap or after it, never half of one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from tuneloop.services.registry.core import vllm_name


@dataclass(frozen=True)
class Route:
    """The routing of one alias. ``None`` as a version means the base model."""

    alias: str
    production: str | None
    candidate: str | None = None
    canary_share: float = 0.0
    shadow_share: float = 0.0

    def __post_init__(self) -> None:
        for name in ("canary_share", "shadow_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r}: give a share between 0 and 1")
        if self.candidate is not None and self.candidate == self.production:
            raise ValueError(f"{self.candidate} cannot be production and candidate at once")

    def choose(self, user: str) -> str | None:
        """The version that answers ``user``: the candidate for its sticky share, else production."""
        if self.candidate is not None and self.canary_share > 0 and \
                bucket(f"{self.candidate}:{user}") < self.canary_share:
            return self.candidate
        return self.production

    def shadow(self, request_key: str) -> bool:
        """Whether the candidate also answers this production request, unseen."""
        return (self.candidate is not None and self.shadow_share > 0
                and bucket(f"shadow:{self.candidate}:{request_key}") < self.shadow_share)

    def versions(self) -> set[str]:
        """The adapter versions this route can send traffic to."""
        return {v for v in (self.production, self.candidate) if v is not None}


def bucket(key: str) -> float:
    """A uniform, stable number in [0, 1) for ``key``."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def upstream_name(alias: str, version: str | None, base_name: str) -> str:
    """The model name vLLM knows: ``support-bot-v7``, or the base model's served name."""
    return base_name if version is None else vllm_name(alias, version)


@dataclass(frozen=True)
class RoutingTable:
    """Every alias's route; replaced whole on each change."""

    routes: dict[str, Route] = field(default_factory=dict)

    def get(self, alias: str) -> Route | None:
        return self.routes.get(alias)

    def with_route(self, route: Route) -> RoutingTable:
        return RoutingTable({**self.routes, route.alias: route})

    def versions(self) -> set[tuple[str, str]]:
        """(alias, version) pairs that must be loaded on every ready replica."""
        return {(r.alias, v) for r in self.routes.values() for v in r.versions()}

