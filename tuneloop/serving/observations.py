"""What each adapter version did for users, request by request, for the canary's live gate.

Prometheus histograms give bucketed latencies; a Mann-Whitney test needs the raw
values. The gateway keeps the last ``capacity`` user requests (time, alias, version,
ok, latency) in memory and answers ``GET /admin/observations`` from them. Evaluation
requests on the internal route are not users and are never recorded.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any


class Observations:
    """The last ``capacity`` user requests, oldest dropped first."""

    def __init__(self, capacity: int = 200_000) -> None:
        self._items: deque[tuple[float, str, str, bool, float]] = deque(maxlen=capacity)

    def record(self, alias: str, version: str | None, ok: bool, latency_s: float) -> None:
        """One answered (or failed) user request; ``version`` None is the base model."""
        self._items.append((time.time(), alias, version or "base", ok, latency_s))

    def since(self, alias: str, since: float,
              until: float | None = None) -> dict[str, dict[str, Any]]:
        """Per version of ``alias``: requests, errors and latencies of requests answered from
        ``since`` up to ``until`` (seconds since the epoch; None: now). Failed requests count
        as errors, not as latencies."""
        out: dict[str, dict[str, Any]] = {}
        for at, a, version, ok, latency in list(self._items):
            if a != alias or at < since or (until is not None and at >= until):
                continue
            side = out.setdefault(version, {"requests": 0, "errors": 0, "latencies_s": []})
            side["requests"] += 1
            if ok:
                side["latencies_s"].append(round(latency, 5))
            else:
                side["errors"] += 1
        return out
