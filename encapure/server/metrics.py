"""HTTP metrics, on the same registry as the scheduler's so ``/metrics`` is one page."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry, error_kinds: list[str] | None = None) -> None:
        """``error_kinds``: every error ``type`` the server can answer, each given a zero series
        up front so that a rate() alert on a kind that never happened yet still has data."""
        r = registry
        self.requests = Counter(
            "encapure_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "encapure_http_request_duration_seconds",
            "HTTP request latency (arrival to last byte sent)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("encapure_http_requests_in_flight", "HTTP requests being served", registry=r)
        self.disconnects = Counter(
            "encapure_http_client_disconnects",
            "Requests whose client went away before the answer",
            ["route"],
            registry=r,
        )
        self.items = Counter(
            "encapure_http_items", "Inputs (documents, texts) received by route", ["route"], registry=r
        )
        self.tokens = Counter(
            "encapure_http_tokens", "Tokens computed for answered requests by route", ["route"], registry=r
        )
        self.errors = Counter(
            "encapure_http_errors",
            "Error answers by their JSON error type (499 client disconnects as request_cancelled)",
            ["type"],
            registry=r,
        )
        for kind in error_kinds or ():
            self.errors.labels(kind)
        self.ready = Gauge(
            "encapure_ready", "1 when models are loaded and warmed and not draining", registry=r
        )
