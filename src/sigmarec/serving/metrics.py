"""Prometheus metrics of the HTTP service (``GET /metrics``).

Each app gets its own registry, so several apps in one process (the tests) do not collide and
``/metrics`` shows only the service's own series. Endpoint labels are route templates
(``/v1/items/{item_id}``), never raw paths, so the number of series stays bounded.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Latency buckets from 1 ms to 30 s: a tiny model on loopback up to a cold LLM on CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sigma_http_requests", "HTTP requests answered",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("sigma_http_request_seconds", "HTTP request latency",
                                 ["endpoint", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("sigma_http_in_flight", "requests being answered", registry=r)
        self.rejected = Counter("sigma_http_rejected", "requests refused before handling",
                                ["reason"], registry=r)
        self.batch_size = Histogram("sigma_batch_size", "requests fused into one model call",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("sigma_batch_seconds", "seconds of one model call",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.ready = Gauge("sigma_ready", "1 once the model is loaded", registry=r)
        self.load_seconds = Gauge("sigma_load_seconds", "seconds the run took to load",
                                  registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint, method).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
