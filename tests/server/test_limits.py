"""Backpressure and fairness on a real server with small limits: requests beyond the bound on those in flight
and beyond a key's rate are refused at once with RESOURCE_EXHAUSTED and a retry hint, which gRPC's own retry
policy in the client honours; a rollback and a promotion racing each other cannot both win."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from instructd.client import ApiError
from instructd.client import requests as build
from instructd.v1 import instructd_pb2_grpc as pb_grpc
from instructd.v1.metadata import RETRY_AFTER, RETRY_PUSHBACK_MS

from ..conftest import ServerProcess
from ..lora import train_marker_adapter

IN_FLIGHT, GENERATE_RATE, FEEDBACK_RATE = 3, 2, 5


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    root = tmp_path_factory.mktemp("limited")
    server = ServerProcess(root / "data", root / "server.log", "--host", "0.0.0.0", "--max-in-flight",
                           str(IN_FLIGHT), "--generate-per-second", str(GENERATE_RATE), "--feedback-per-second",
                           str(FEEDBACK_RATE))
    server.start()
    yield server
    assert server.stop() == 0


def _bare(server, key: str):
    """A stub with no retry policy, to see the server's own answers."""
    channel = grpc.aio.insecure_channel(server.target, options=[("grpc.enable_retries", 0)])
    return channel, pb_grpc.InferenceStub(channel), pb_grpc.FeedbackStub(channel), (("authorization", f"Bearer {key}"),)


async def _outcomes(calls) -> list[tuple[grpc.StatusCode, dict, str]]:
    """Each call's status code, and its trailing metadata and details when it was refused."""
    async def one(call):
        try:
            await call
            return grpc.StatusCode.OK, {}, ""
        except grpc.aio.AioRpcError as error:
            return error.code(), dict(error.trailing_metadata() or ()), error.details() or ""
    return await asyncio.gather(*(one(c) for c in calls))


def test_serving_in_clear_on_every_interface_is_warned_about(limited):
    assert "WITHOUT TLS" in limited.log_path.read_text()


def test_requests_beyond_the_bound_in_flight_are_refused_at_once(limited):
    async def run():
        channel, inference, _, metadata = _bare(limited, limited.api_key)  # an admin key: no rate limit
        async with channel:
            long = build.generate("Write a long story about a lighthouse.", max_tokens=300, temperature=0)
            return await _outcomes([inference.Generate(long, metadata=metadata) for _ in range(12)])

    outcomes = asyncio.run(run())
    codes = [code for code, _, _ in outcomes]
    assert codes.count(grpc.StatusCode.OK) == IN_FLIGHT
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 12 - IN_FLIGHT
    refused = [meta for code, meta, _ in outcomes if code != grpc.StatusCode.OK]
    assert all(int(m[RETRY_AFTER]) >= 1 and int(m[RETRY_PUSHBACK_MS]) > 0 for m in refused)


def test_a_keys_rate_limit_refuses_with_a_hint_and_the_client_retries(limited):
    with limited.client() as admin:
        _, key = admin.create_key("rate-limited", "app")
    with limited.client(key) as client:
        rated = client.generate("Say hi.", max_tokens=2)

    async def burst():
        channel, inference, feedback, metadata = _bare(limited, key)
        async with channel:
            # All at once, so the limiter sees them within moments of each other however slowly answers come: the
            # burst allowance passes it (and then meets the bound on requests in flight), the rest are refused.
            generated = await _outcomes([inference.Generate(build.generate("Say hi.", max_tokens=2), metadata=metadata)
                                         for _ in range(10)])
            ratings = await _outcomes([feedback.Submit(build.feedback(rated.response_id, "up", user_id=f"u{i}"),
                                                       metadata=metadata) for i in range(1000)])
            return generated, ratings

    time.sleep(2 * 2 / GENERATE_RATE)  # a full bucket to start from: nothing to await across processes
    generated, ratings = asyncio.run(burst())
    rate_refused = [meta for code, meta, details in generated
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("rate limit")]
    assert 2 * GENERATE_RATE <= 10 - len(rate_refused) < 10  # the burst allowance, then refusals
    assert all(RETRY_AFTER in m and RETRY_PUSHBACK_MS in m for m in rate_refused)
    ok = [code for code, _, _ in generated].count(grpc.StatusCode.OK)
    assert 1 <= ok <= min(IN_FLIGHT, 10 - len(rate_refused))
    assert [code for code, _, _ in generated].count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 10 - ok
    taken = [code for code, _, _ in ratings].count(grpc.StatusCode.OK)
    assert taken < 100 and [code for code, _, _ in ratings].count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 1000 - taken
    assert limited.db()["feedback"].count_where("response_id = ?", [rated.response_id]) == taken
    # The client's retry policy waits as the server says and gets through, with no loop of ours.
    with limited.client(key) as client:
        answers = [client.generate("Say hi.", max_tokens=2) for _ in range(2 * GENERATE_RATE + 2)]
    assert len({a.response_id for a in answers}) == 2 * GENERATE_RATE + 2


def test_promotion_and_rollback_racing_cannot_both_win(limited, model_dir):
    with limited.client() as admin:
        folder = train_marker_adapter(model_dir, limited.adapter_dir / "race", steps=1)
        first, second = admin.register(str(folder)).version, admin.register(str(folder)).version
        admin.promote(first)

        async def race():
            async with limited.async_client() as client:
                return await asyncio.gather(client.promote(second, expected_current=first),
                                            client.rollback(0, expected_current=first), return_exceptions=True)

        for _ in range(4):
            outcomes = asyncio.run(race())
            won = [o for o in outcomes if not isinstance(o, BaseException)]
            lost = [o for o in outcomes if isinstance(o, BaseException)]
            assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], ApiError)
            assert lost[0].code == grpc.StatusCode.ABORTED
            assert admin.adapters()[1] == won[0].promoted_version  # what serves is what the winner set
            admin.promote(first)
        with pytest.raises(ApiError) as error:
            admin.rollback(expected_current=second)  # first serves: the compare-and-swap refuses
        assert error.value.code == grpc.StatusCode.ABORTED
        # Which of the two wins a race is up to timing (in one CI run the promotion won all four), so the rollback's
        # own record is checked on one that expects what serves: it is taken, and audited.
        assert admin.rollback(0, expected_current=first).promoted_version == 0 and admin.adapters()[1] == 0
        assert any(e.action == "rolled_back" and e.target == f"v{first} -> v0" for e in admin.audit(50))
