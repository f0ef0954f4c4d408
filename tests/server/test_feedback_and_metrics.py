"""Feedback is durable and visible in stats and on /metrics; health and reflection are served."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from instructd.client.channel import channel as open_channel


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
    assert {s.app_id for s in client.stats().adapters} == {"tests"}  # an application key sees its own
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
    assert moved("instructd_store_write_batch_writes_sum") >= 2  # the exchange and the rating, at least
    assert moved("instructd_store_write_batch_writes_count") >= 1  # batches; a key's "last used" may make one more
    assert moved("instructd_store_write_batch_seconds_count") >= 1
    assert after['instructd_requests_in_flight{method="Generate"}'] == 0
    assert after["instructd_promoted_adapter_version"] == client.stats().promoted_version
    assert any(k.startswith("vllm:") for k in after), "vLLM's engine metrics belong on the same page"


def test_health_needs_no_key_and_reflection_lists_every_service(server, app_key):
    with grpc.insecure_channel(server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as error:  # the schema is served to key holders only
            ProtoReflectionDescriptorDatabase(channel).get_services()
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel, metadata = open_channel(server.target, app_key, None, aio=False)
    with grpc.intercept_channel(channel, _WithMetadata(metadata)) as keyed:
        services = set(ProtoReflectionDescriptorDatabase(keyed).get_services())
    assert {"instructd.v1.Inference", "instructd.v1.Feedback", "instructd.v1.Admin", "instructd.v1.Access",
            "grpc.health.v1.Health"} <= services


class _WithMetadata(grpc.StreamStreamClientInterceptor):
    """Reflection's client takes no metadata argument: add the key to its calls."""

    def __init__(self, metadata) -> None:
        self.metadata = metadata

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(details._replace(metadata=self.metadata), requests)
