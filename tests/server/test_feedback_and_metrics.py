"""Feedback is durable and visible in stats and on /metrics; health and reflection are served."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from instructd.client import Client


def test_feedback_is_committed_before_it_is_acknowledged(server, client):
    answer = client.generate("Say hello.", max_tokens=8, temperature=0)
    feedback_id = client.feedback(answer.response_id, "up", comment="nice", user_id="bob")
    # A separate connection to the file (the server still runs): the row is there, committed.
    row = server.db()["feedback"].get(feedback_id)
    assert (row["response_id"], row["rating"], row["comment"], row["user_id"]) == (answer.response_id, "up",
                                                                                    "nice", "bob")


def test_a_later_rating_by_the_same_user_replaces_the_earlier(server, client):
    answer = client.generate("Say hello.", max_tokens=8, temperature=0)
    first = client.feedback(answer.response_id, "up", user_id="carol")
    second = client.feedback(answer.response_id, "down", correction="Hello!", user_id="carol")
    other = client.feedback(answer.response_id, "up", user_id="dave")
    assert first == second != other
    rows = list(server.db()["feedback"].rows_where(
        "response_id = ?", [answer.response_id], order_by="user_id"))
    assert [(r["user_id"], r["rating"], r["correction"]) for r in rows] == [("carol", "down", "Hello!"),
                                                                             ("dave", "up", "")]


def test_stats_and_metrics_count_exchanges_and_ratings(server, client):
    before_stats = {s.adapter_version: s for s in client.stats().adapters}
    before = server.metrics()
    answer = client.generate("Name a planet.", max_tokens=8, temperature=0)
    client.feedback(answer.response_id, "down")
    after = server.metrics()
    base = {s.adapter_version: s for s in client.stats().adapters}[0]
    assert base.exchanges == before_stats[0].exchanges + 1
    assert base.ratings_down == before_stats[0].ratings_down + 1

    def moved(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert moved('instructd_requests_total{code="OK",method="Generate"}') == 1
    assert moved('instructd_requests_total{code="OK",method="Submit"}') == 1
    assert moved('instructd_feedback_total{adapter_version="0",rating="down"}') == 1
    assert moved("instructd_completion_tokens_total") == answer.completion_tokens
    assert moved("instructd_prompt_tokens_total") == answer.prompt_tokens
    assert moved('instructd_request_duration_seconds_count{method="Generate"}') == 1
    assert moved("instructd_time_to_first_token_seconds_count") == 1
    assert after['instructd_requests_in_flight{method="Generate"}'] == 0
    assert after["instructd_promoted_adapter_version"] == client.stats().promoted_version
    assert any(k.startswith("vllm:") for k in after), "vLLM's engine metrics belong on the same page"


def test_health_and_reflection_list_every_service(server):
    with grpc.insecure_channel(server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"instructd.v1.Inference", "instructd.v1.Feedback", "instructd.v1.Admin",
            "grpc.health.v1.Health"} <= services


def test_app_id_comes_from_request_metadata(server):
    with Client(server.target, app_id="billing-bot") as c:
        answer = c.generate("Say hi.", max_tokens=4)
    assert server.exchange(answer.response_id)["app_id"] == "billing-bot"
