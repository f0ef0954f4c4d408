"""Prometheus metrics of the service, and the /metrics endpoint that also shows vLLM's own engine metrics."""

from __future__ import annotations

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

METHODS = ("Generate", "GenerateStream", "Submit", "ListAdapters", "RegisterAdapter", "Promote", "Rollback",
           "GetStats")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Every metric instructd exports; tests give it their own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        ns = {"namespace": "instructd", "registry": registry}
        self.requests = Counter("requests", "gRPC requests by method and status code.", ["method", "code"], **ns)
        self.request_seconds = Histogram("request_duration_seconds", "gRPC request latency.", ["method"],
                                         buckets=_LATENCY_BUCKETS, **ns)
        self.ttft_seconds = Histogram("time_to_first_token_seconds", "Time from request to first generated text.",
                                      buckets=_LATENCY_BUCKETS, **ns)
        self.in_flight = Gauge("requests_in_flight", "gRPC requests being served.", ["method"], **ns)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens processed.", **ns)
        self.completion_tokens = Counter("completion_tokens", "Tokens generated.", **ns)
        self.feedback = Counter("feedback", "Ratings committed, by rating and adapter version that answered.",
                                ["rating", "adapter_version"], **ns)
        self.promoted_version = Gauge("promoted_adapter_version", "Adapter version serving new requests (0: base).",
                                      **ns)
        self.promotions = Counter("promotions", "Promotions and rollbacks.", ["kind"], **ns)
        for method in METHODS:
            self.in_flight.labels(method)
            for code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                self.requests.labels(method, code.name)
        for kind in ("promote", "rollback"):
            self.promotions.labels(kind)
        for rating in ("up", "down"):
            self.feedback.labels(rating, "0")


class _Both:
    """A collector view over our registry and the default one, where vLLM registers its engine metrics."""

    def __init__(self, ours: CollectorRegistry) -> None:
        self._ours = ours

    def collect(self):
        yield from self._ours.collect()
        yield from REGISTRY.collect()


def serve_metrics(metrics: Metrics, host: str, port: int) -> int:
    """Starts the /metrics HTTP server in a background thread; returns the port it listens on."""
    server, _ = start_http_server(port, addr=host, registry=_Both(metrics.registry))
    return server.server_address[1]
