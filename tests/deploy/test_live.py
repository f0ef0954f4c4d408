"""The operators' view on the real service: a real Prometheus scrapes a real instructd through traffic, ratings, a
promotion and a tuning run; then every query of every dashboard panel and annotation must return data, with the
labels its legend names. A panel whose query returns nothing is a broken panel. `instructd top` reads the same page."""

from __future__ import annotations

import json
import math
import re

import pytest
from click.testing import CliRunner

from instructd.client import ApiError
from instructd.client.cli import main
from instructd.client.tuning import TuningClient
from instructd.v1 import instructd_pb2 as pb

from ..conftest import ServerProcess
from ..lora import PROMPTS, train_marker_adapter
from .prometheus import DEPLOY, NOT_INSTALLED, PROMETHEUS, Prometheus

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason=NOT_INSTALLED)

DASHBOARD = DEPLOY / "grafana/dashboards/instructd.json"
# Grafana's variables, filled in as for a dashboard of the last hour; windows long enough to hold all the traffic.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h"}


@pytest.fixture(scope="module")
def watched(tmp_path_factory, model_dir):
    """A server with a trained adapter waiting in its adapter directory, and a Prometheus scraping it."""
    root = tmp_path_factory.mktemp("watched")
    server = ServerProcess(root / "data", root / "server.log")
    adapter = train_marker_adapter(model_dir, server.adapter_dir / "marker", steps=4)  # valid is enough here
    server.start()
    try:
        with Prometheus(root / "prometheus", f"127.0.0.1:{server.metrics_port}") as prometheus:
            drive(server, adapter)
            # The last of it (the run, the promoted version's ratings) scraped and through the recording rules:
            # from here on every test sees everything.
            prometheus.wait_for("instructd:ratings:serving >= 3 and on () "
                                "instructd_tuning_last_run_finished_timestamp_seconds")
            yield server, prometheus
    finally:
        assert server.stop() == 0, f"unclean shutdown; log: {server.log_path}"


def drive(server: ServerProcess, adapter) -> None:
    """What the dashboard shows: answers (unary and streamed), 👍 and 👎, a client error, a promotion, answers and
    ratings on the promoted version, and a finished tuning run."""
    with server.client() as client:  # the admin key: it may answer, rate, register and promote
        for i, prompt in enumerate(PROMPTS[:4]):
            answer = client.generate(prompt, max_tokens=12, temperature=0)
            client.feedback(answer.response_id, "up" if i % 2 else "down")
        *_, streamed = client.stream(PROMPTS[4], max_tokens=12)
        client.feedback(streamed.response_id, "up")
        with pytest.raises(ApiError):
            client.feedback("no-such-response", "up")
        version = client.register(str(adapter)).version
        client.promote(version, expected_current=0)
        for prompt in PROMPTS[5:]:
            answer = client.generate(prompt, max_tokens=12, temperature=0)
            assert answer.adapter_version == version
            client.feedback(answer.response_id, "up")
    # A tuning run recorded the way the tuner records its runs (through the Tuning API), without the training:
    # the loop test (tests/tuner/test_loop.py) runs real ones.
    with TuningClient(server.target, api_key=server.api_key) as tuner:
        verdict = pb.Verdict(passed=False, reason="not better", candidate_margin=0.1, current_margin=0.2)
        tuner.update_run(tuner.start_run("threshold").id, outcome="rejected", verdict=verdict, examples=8, loss=0.9,
                         candidate_version=version)


def queries() -> list[tuple[str, str, set[str]]]:
    """(where, PromQL, labels its legend needs) for every panel target and annotation of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = [(panel["title"], target["expr"], target.get("legendFormat", ""))
             for panel in dashboard["panels"] for target in panel.get("targets", [])]
    found += [(f"annotation {a['name']}", a["expr"], a.get("titleFormat", "") + a.get("textFormat", ""))
              for a in dashboard["annotations"]["list"] if "expr" in a]
    for name, value in GRAFANA_VARIABLES.items():
        found = [(where, expr.replace(name, value), legend) for where, expr, legend in found]
    return [(where, expr, set(re.findall(r"{{\s*(\w+)\s*}}", legend))) for where, expr, legend in found]


def broken(prometheus: Prometheus, expr: str, labels: set[str]) -> str | None:
    """Why the query's result would leave its panel broken; None if it is fine."""
    result = prometheus.query(expr)
    if not result:
        return "no data"
    missing = [r["metric"] for r in result if not labels <= r["metric"].keys()]
    if missing:
        return f"series without the legend's labels {sorted(labels)}: {missing}"
    if not any(math.isfinite(float(r["value"][1])) for r in result):
        return f"no number, only {[r['value'][1] for r in result]}"
    return None


def test_every_dashboard_query_returns_data_with_its_labels(watched):
    _, prometheus = watched
    all_queries = queries()
    assert len(all_queries) >= 25
    failures = {f"{where}: {expr}": why for where, expr, labels in all_queries
                if (why := broken(prometheus, expr, labels))}
    assert not failures, "\n".join(f"{query}\n    -> {why}" for query, why in failures.items())


def test_the_promotion_and_the_ratings_are_seen_per_version(watched):
    _, prometheus = watched
    [promoted] = prometheus.query("instructd_serving_adapter_promoted_timestamp_seconds")
    assert (promoted["metric"]["adapter_version"], promoted["metric"]["previous_version"]) == ("1", "0")
    rated = {r["metric"]["role"]: r["metric"]["adapter_version"] for r in prometheus.query("instructd_adapter_role")}
    assert rated == {"serving": "1", "previous": "0"}
    [serving] = prometheus.query("instructd:ratings_up:serving / instructd:ratings:serving")
    [previous] = prometheus.query("instructd:ratings_up:previous / instructd:ratings:previous")
    assert (float(serving["value"][1]), float(previous["value"][1])) == (1.0, 3 / 5)


def test_top_shows_the_same_page(watched):
    server, _ = watched
    result = CliRunner().invoke(main, ["top", "--once", "--interval", "0.5", "--target", server.target,
                                       "--api-key", server.api_key,
                                       "--metrics-url", f"http://127.0.0.1:{server.metrics_port}/metrics"])
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.output.splitlines()]
    assert ["serving", "v1", "since"] == lines[0][:3] and lines[0][-2:] == ["(replaced", "base)"]
    assert ["v1", "serving", "100%", "of", "3"] in lines and ["base", "previous", "60%", "of", "5"] in lines
    assert ["tuning", "run", "1", "rejected,", "candidate", "v1"] == lines[-1][:6]
    assert re.search(r"requests/s +\d+\.\d\d", result.output) and "p50" in result.output
