"""Prometheus metrics of the service, and the /metrics endpoint that also shows vLLM's own engine metrics."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from datetime import datetime
from pathlib import Path

import grpc
from instructd.v1 import instructd_pb2 as pb
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Every rpc of every instructd service, from the wire contract itself, so a new rpc cannot be left out.
METHODS = tuple(m.name for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods)
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
        self.promoted_unloadable = Gauge(
            "promoted_adapter_unloadable", "The promoted version that could not be loaded at start, so the base "
            "model serves instead (0: none).", **ns)
        self.adapter_load_failures = Counter(
            "adapter_load_failures", "Adapter versions the engine could not load, by when it was tried.", ["phase"],
            **ns)
        self.log_write_failures = Counter("log_write_failures", "Exchanges that could not be written to the store.",
                                          **ns)
        for method in METHODS:
            self.in_flight.labels(method)
            for code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                self.requests.labels(method, code.name)
        for kind in ("promote", "rollback"):
            self.promotions.labels(kind)
        for phase in ("start", "request"):
            self.adapter_load_failures.labels(phase)
        for rating in ("up", "down"):
            self.feedback.labels(rating, "0")


class TuningCollector:
    """Tuner metrics, read from the tuning runs in the store at scrape time: they survive restarts and
    need no link from the tuner process to this one."""

    OUTCOMES = ("promoted", "rejected", "failed", "skipped")

    def __init__(self, db_path: Path) -> None:
        self._db_path = db_path

    def collect(self):
        with closing(sqlite3.connect(f"file:{self._db_path}?mode=ro", uri=True, timeout=5)) as db:
            db.row_factory = sqlite3.Row
            counts = dict(db.execute("SELECT status, COUNT(*) FROM tuning_runs GROUP BY status").fetchall())
            last = db.execute("SELECT * FROM tuning_runs WHERE status != 'running' AND status != 'skipped' "
                              "ORDER BY id DESC LIMIT 1").fetchone()
        runs = CounterMetricFamily("instructd_tuning_runs", "Tuning runs by outcome.", labels=["outcome"])
        for outcome in self.OUTCOMES:
            runs.add_metric([outcome], counts.get(outcome, 0))
        yield runs
        yield GaugeMetricFamily("instructd_tuning_run_in_progress", "1 while a tuning run is going on.",
                                value=counts.get("running", 0))
        if last is None:
            return
        detail = json.loads(last["metadata_json"] or "{}")
        started, finished = (datetime.fromisoformat(last[k]) for k in ("started_at", "finished_at"))
        yield GaugeMetricFamily("instructd_tuning_last_run_duration_seconds", "Duration of the last finished run.",
                                value=(finished - started).total_seconds())
        yield GaugeMetricFamily("instructd_tuning_last_run_examples", "Training examples of the last finished run.",
                                value=last["examples"] or 0)
        yield GaugeMetricFamily("instructd_tuning_last_run_loss", "Final training loss of the last finished run.",
                                value=last["loss"] or 0.0)
        verdict = detail.get("verdict") or {}
        gate = GaugeMetricFamily("instructd_tuning_last_gate_score", "Gate scores of the last evaluated candidate.",
                                 labels=["gate", "model"])
        for name, key in (("feedback_margin", "margin"), ("suite", "suite")):
            for model in ("candidate", "current"):
                if f"{model}_{key}" in verdict:
                    gate.add_metric([name, model], verdict[f"{model}_{key}"])
        yield gate


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
