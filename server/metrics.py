"""Prometheus metrics of the service, and the /metrics endpoint that also shows vLLM's own engine metrics.
deploy/ holds the dashboard and alert rules built on these names; tests/deploy checks them against a real Prometheus."""

from __future__ import annotations

import socket
import threading
from datetime import datetime
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

from instructd.v1 import instructd_pb2 as pb

from .canary import CanaryOutcome, Tally
from .domain import BASE_VERSION
from .records import RunOutcome, RunRecord

# Every rpc of every instructd service, from the wire contract itself, so a new rpc cannot be left out.
METHODS = tuple(m.name for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods)
# Created up front for every method, so that panels and ratios have a series before the first error: success, the
# commonest client errors, and the server errors the error-ratio alert counts.
_CODES = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
          grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
# Seconds; one set for time to first token and for whole requests, on GPU and CPU alike: a GPU gives the first token
# in 10-50 ms, this 2-core CPU in 50-300 ms (tiny model, idle), and a long answer on CPU takes minutes. Steps of 2 to
# 2.5x from 5 ms to 5 min keep every quantile within one bucket of the truth; 2.5 s is an edge because the TTFT alert
# fires there.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)  # a group commit: well under 10 ms
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # 256: the most writes the store's writer commits at once
RATINGS = ("up", "down")
# Versions that carry their own adapter_version label value, in order of precedence when one version has two roles.
ROLES = ("serving", "canary", "previous", "candidate")
OTHER_VERSIONS = "other"  # the adapter_version label value of every version without a role


class Metrics:
    """Every metric instructd exports; tests give it their own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        ns = {"namespace": "instructd", "registry": registry}
        self.requests = Counter("requests", "gRPC requests by method and status code.", ["method", "code"], **ns)
        self.request_seconds = Histogram("request_duration_seconds", "gRPC request latency.", ["method"],
                                         buckets=LATENCY_BUCKETS, **ns)
        self.ttft_seconds = Histogram("time_to_first_token_seconds", "Time from request to first generated text.",
                                      buckets=LATENCY_BUCKETS, **ns)
        self.in_flight = Gauge("requests_in_flight", "gRPC requests being served.", ["method"], **ns)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens processed.", **ns)
        self.completion_tokens = Counter("completion_tokens", "Tokens generated.", **ns)
        self.feedback = Counter("feedback", "Ratings committed, by rating and by the adapter version that answered "
                                "(versions without a role in instructd_adapter_role count as 'other').",
                                ["rating", "adapter_version"], **ns)
        self.promoted_version = Gauge("promoted_adapter_version", "Adapter version serving new requests (0: base).",
                                      **ns)
        self.promoted_at = Gauge("serving_adapter_promoted_timestamp_seconds",
                                 "When the serving adapter version was promoted (Unix time), and the one it replaced.",
                                 ["adapter_version", "previous_version"], **ns)
        self.adapter_role = Gauge("adapter_role", "1 for each adapter version with its own label value: the serving "
                                  "one, the one it replaced and the newest registered.", ["adapter_version", "role"],
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
        # What answering only once the exchange is committed adds to a request: the wait for the commit.
        self.commit_seconds = Histogram("exchange_commit_wait_seconds", "Time an answer waited for its exchange to be "
                                        "committed before it was sent.", buckets=COMMIT_BUCKETS, **ns)
        # The store's writer (one thread, group commit): how many writes share a commit, and how busy it is.
        self.write_batch_writes = Histogram("store_write_batch_writes", "Writes (ratings, exchanges, ...) the store "
                                            "committed together.", buckets=BATCH_BUCKETS, **ns)
        self.write_batch_seconds = Histogram("store_write_batch_seconds", "Time the store's writer took to run and "
                                             "commit one batch; the rate of its sum is the share of time it is in "
                                             "one.", buckets=COMMIT_BUCKETS, **ns)
        self.canary_version = Gauge("canary_adapter_version", "Adapter version serving as a canary (0: none).", **ns)
        self.canary_share = Gauge("canary_share", "Share of users routed to the canary (0: no canary).", **ns)
        self.canary_users = Gauge("canary_users", "Distinct users the canary has answered (a request "
                                  "without a user id counts as one).", **ns)
        self.canary_ratings = Gauge("canary_ratings", "Ratings of the answers the canary (arm 'candidate') and the "
                                    "promoted version beside it ('incumbent') gave since the canary started.",
                                    ["arm", "rating"], **ns)
        self.canary_p_worse = Gauge("canary_probability_worse", "Posterior probability that the canary's 👍 rate is "
                                    "below the incumbent's (rolled back at 0.998).", **ns)
        self.canary_outcomes = Counter("canary_outcomes", "Canaries ended, by how.", ["outcome"], **ns)
        self.health_serving = Gauge("health_serving", "1 while gRPC health says SERVING; 0 before and after.", **ns)
        for method in METHODS:
            self.in_flight.labels(method)
            for code in _CODES:
                self.requests.labels(method, code.name)
        for kind in ("promote", "rollback"):
            self.promotions.labels(kind)
        for phase in ("start", "request"):
            self.adapter_load_failures.labels(phase)
        for rating in RATINGS:
            self.feedback.labels(rating, OTHER_VERSIONS)
            for arm in ("candidate", "incumbent"):
                self.canary_ratings.labels(arm, rating)
        for outcome in CanaryOutcome:
            self.canary_outcomes.labels(outcome.value)
        self._roles: dict[str, int | None] = {}  # role -> version
        self._labelled: set[int] = set()
        self.serving_changed(BASE_VERSION, previous=None, promoted_at=None)

    def serving_changed(self, version: int, previous: int | None, promoted_at: float | None) -> None:
        """Records which version serves new requests, since when (None: not known) and which one it replaced."""
        self.promoted_version.set(version)
        self.promoted_at.clear()
        if promoted_at is not None:
            self.promoted_at.labels(str(version), "" if previous is None else str(previous)).set(promoted_at)
        self._roles.update(serving=version, previous=previous)
        self._relabel()

    def candidate_registered(self, version: int) -> None:
        self._roles["candidate"] = version
        self._relabel()

    def canary_changed(self, canary, ended: CanaryOutcome | None = None) -> None:
        """Shows the running canary (a router.Canary), or that none runs, counting how the last one ended."""
        if ended:
            self.canary_outcomes.labels(ended.value).inc()
        tally = canary.tally if canary else Tally()
        self.canary_version.set(canary.record.version if canary else 0)
        self.canary_share.set(canary.record.share if canary else 0)
        self.canary_users.set(len(canary.users) if canary else 0)
        self.canary_p_worse.set(canary.p_worse if canary else 0)
        for (arm, rating), n in {("candidate", "up"): tally.candidate_up, ("candidate", "down"): tally.candidate_down,
                                 ("incumbent", "up"): tally.incumbent_up,
                                 ("incumbent", "down"): tally.incumbent_down}.items():
            self.canary_ratings.labels(arm, rating).set(n)
        if self._roles.get("canary") != (canary.record.version if canary else None):
            self._roles["canary"] = canary.record.version if canary else None
            self._relabel()

    def write_batch(self, writes: int, seconds: float) -> None:
        """The store's on_batch: called from its writer thread (prometheus_client's metrics are thread-safe)."""
        self.write_batch_writes.observe(writes)
        self.write_batch_seconds.observe(seconds)

    def count_feedback(self, rating: str, version: int) -> None:
        """Counts a committed rating under the version that answered, or under 'other' for a version without a role."""
        self.feedback.labels(rating, str(version) if version in self._labelled else OTHER_VERSIONS).inc()

    def _relabel(self) -> None:
        """Bounds adapter_version's values: a long-running server promotes version after version, and a label value
        per version ever served would grow without end. Only the versions an operator compares (serving, previous,
        newest candidate) keep their own series; the series of a version that loses its role are removed (Prometheus
        keeps their history) and its later ratings count as 'other'."""
        self.adapter_role.clear()
        labelled: dict[int, str] = {}
        for role in ROLES:
            version = self._roles.get(role)
            if version is not None and version not in labelled:
                labelled[version] = role
                self.adapter_role.labels(str(version), role).set(1)
        for version in self._labelled - labelled.keys():
            for rating in RATINGS:
                self.feedback.remove(rating, str(version))
        for version in labelled:
            for rating in RATINGS:
                self.feedback.labels(rating, str(version))
        self._labelled = set(labelled)


class TuningCollector:
    """Tuner metrics, read from the tuning runs in the store at scrape time: they survive restarts and need no
    link from the tuner (wherever it runs) to this process. `summary()` is the store's tuning_summary."""

    def __init__(self, summary) -> None:
        self._summary = summary

    def collect(self):
        s = self._summary()
        runs = CounterMetricFamily("instructd_tuning_runs", "Tuning runs by outcome.", labels=["outcome"])
        for outcome in RunOutcome:
            if outcome is not RunOutcome.RUNNING:
                runs.add_metric([outcome.stored], s.counts.get(outcome, 0))
        yield runs
        yield GaugeMetricFamily("instructd_tuning_run_in_progress", "1 while a tuning run is going on.",
                                value=s.counts.get(RunOutcome.RUNNING, 0))
        yield GaugeMetricFamily("instructd_tuning_new_ratings",
                                "Ratings no tuning run has used up (one rejected for too little evidence keeps them).",
                                value=s.new_ratings)
        yield GaugeMetricFamily("instructd_tuning_consecutive_failed_runs",
                                "Failed runs since the last run that reached a verdict.", value=s.failed_in_a_row)
        if s.last is not None:
            yield from self._last_run(s.last)

    @staticmethod
    def _last_run(last: RunRecord):
        started, finished = (datetime.fromisoformat(t) for t in (last.started_at, last.finished_at))
        ended = GaugeMetricFamily("instructd_tuning_last_run_finished_timestamp_seconds",
                                  "When the last finished run ended (Unix time), with its id and outcome.",
                                  labels=["run", "outcome"])
        ended.add_metric([str(last.id), last.outcome.stored], finished.timestamp())
        yield ended
        yield GaugeMetricFamily("instructd_tuning_last_run_duration_seconds", "Duration of the last finished run.",
                                value=(finished - started).total_seconds())
        yield GaugeMetricFamily("instructd_tuning_last_run_examples", "Training examples of the last finished run.",
                                value=last.examples)
        yield GaugeMetricFamily("instructd_tuning_last_run_loss", "Final training loss of the last finished run.",
                                value=last.loss)
        gate = GaugeMetricFamily("instructd_tuning_last_gate_score", "Gate scores of the last evaluated candidate.",
                                 labels=["gate", "model"])
        if last.verdict is not None:
            v = last.verdict
            scores = [("feedback_margin", v.candidate_margin, v.current_margin)]
            if v.suite_by_check:  # the suite was run (not for a candidate that failed on feedback)
                scores.append(("suite", v.candidate_suite, v.current_suite))
            for name, candidate, current in scores:
                gate.add_metric([name, "candidate"], candidate)
                gate.add_metric([name, "current"], current)
        yield gate


class _Both:
    """A collector view over our registry and the default one, where vLLM registers its engine metrics."""

    def __init__(self, ours: CollectorRegistry) -> None:
        self._ours = ours

    def collect(self):
        yield from self._ours.collect()
        yield from REGISTRY.collect()


def metrics_app(metrics: Metrics):
    """The /metrics WSGI app. Always in Prometheus' text format: in OpenMetrics, which Prometheus 2 asks for,
    prometheus_client (0.26, client_python issue 1177) writes the colon of a sample's name as '_' while the TYPE
    line keeps it, so vLLM's 'vllm:' metrics would be stored under names that Prometheus 3, curl and the dashboard
    do not use. The text format keeps every name as it is, and every Prometheus reads it."""
    app = make_wsgi_app(_Both(metrics.registry))

    def text_format(environ, start_response):
        environ["HTTP_ACCEPT"] = "text/plain"
        return app(environ, start_response)

    return text_format


class _Server(ThreadingWSGIServer):
    address_family = socket.AF_INET


class _Server6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        """A line per scrape would bury the server's log."""


def serve_metrics(metrics: Metrics, host: str, port: int) -> int:
    """Starts the /metrics HTTP server in a background thread; returns the port it listens on."""
    server = make_server(host, port, metrics_app(metrics), _Server6 if ":" in host else _Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server.server_port
