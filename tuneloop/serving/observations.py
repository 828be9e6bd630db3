"""What each adapter version did for users, request by request, for the canary's live gate.

Prometheus histograms give bucketed latencies; a Mann-Whitney test needs the raw
values. The gateway keeps the last ``capacity`` user requests (time, alias, version,
ok, latency, output tokens where the answer said) in memory and answers
``GET /admin/observations`` from them. Evaluation
requests on the internal route are not users and are never recorded.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any


class Observations:
    """The last ``capacity`` user requests, oldest dropped first."""

    def __init__(self, capacity: int = 200_000) -> None:
        self._items: deque[tuple[float, str, str, bool, float, int | None]] = deque(
            maxlen=capacity)

    def record(self, alias: str, version: str | None, ok: bool, latency_s: float,
               tokens: int | None = None) -> None:
        """One answered (or failed) user request; ``version`` None is the base model;
        ``tokens``: the answer's output tokens, None where unknown."""
        self._items.append((time.time(), alias, version or "base", ok, latency_s, tokens))

    def since(self, alias: str, since: float,
              until: float | None = None) -> dict[str, dict[str, Any]]:
        """Per version of ``alias``: requests, errors, latencies and output tokens (None
        where unknown, in the latencies' order) of requests answered from ``since`` up to
        ``until`` (seconds since the epoch; None: now). Failed requests count as errors,
        not as latencies."""
        out: dict[str, dict[str, Any]] = {}
        for at, a, version, ok, latency, tokens in list(self._items):
            if a != alias or at < since or (until is not None and at >= until):
                continue
            side = out.setdefault(version, {"requests": 0, "errors": 0, "latencies_s": [],
                                            "tokens": []})
            side["requests"] += 1
            if ok:
                side["latencies_s"].append(round(latency, 5))
                side["tokens"].append(tokens)
            else:
                side["errors"] += 1
        return out
