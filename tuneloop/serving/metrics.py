"""Prometheus metrics of the gateway, per alias and adapter version.

vLLM has no per-adapter metrics of its own, so the gateway measures what each
version served: requests, errors and latency. Each gateway has its own registry
(several can live in one test process).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds; CPU LoRA requests take up to seconds, streams longer.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    """The gateway's counters and histograms, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tuneloop_gateway_requests", "Requests answered, by alias, version, endpoint and status.",
            ["alias", "version", "endpoint", "status"], registry=r)
        self.latency = Histogram(
            "tuneloop_gateway_request_seconds", "Time to the last byte of the answer.",
            ["alias", "version", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.first_byte = Histogram(
            "tuneloop_gateway_first_byte_seconds", "Time to the first byte from vLLM.",
            ["alias", "version", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.errors = Counter(
            "tuneloop_gateway_errors", "Failed requests by alias, version and kind "
            "(bad_request, unavailable, upstream).", ["alias", "version", "kind"], registry=r)
        self.inflight = Gauge("tuneloop_gateway_inflight", "Requests being answered.", registry=r)
        self.replica_ready = Gauge(
            "tuneloop_gateway_replica_ready", "1 when the replica takes traffic.", ["replica"],
            registry=r)
        self.replica_requests = Counter(
            "tuneloop_gateway_replica_requests", "Requests sent to each replica.", ["replica"],
            registry=r)
        self.replica_restarts = Counter(
            "tuneloop_gateway_replica_restarts", "vLLM restarts by the gateway.", ["replica"],
            registry=r)
        self.swaps = Counter(
            "tuneloop_gateway_swaps", "Route changes by result (ok, failed).", ["alias", "result"],
            registry=r)
        self.swap_seconds = Histogram(
            "tuneloop_gateway_swap_seconds", "Verify + load + probe + flip.", ["alias"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=r)
        self.feedback = Counter(
            "tuneloop_gateway_feedback_events", "Events sent to Kafka by kind (feedback, served, "
            "shadow).", ["kind"], registry=r)
        self.routed_around = Counter(
            "tuneloop_gateway_routed_around", "Versions that could not load and were served "
            "around, by role: a candidate taken off its route, a production that fell back.",
            ["alias", "role"], registry=r)
        self.dropped = Counter(
            "tuneloop_gateway_events_dropped", "Events not sent by kind (feedback, served, "
            "shadow) and reason (outbox_full, too_large, invalid).", ["kind", "reason"],
            registry=r)
