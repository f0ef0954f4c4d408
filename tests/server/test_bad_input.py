"""Bad input gets a clear gRPC status, and the server keeps serving."""

from __future__ import annotations

import grpc
import pytest

from instructd.client import ApiError
from instructd.v1 import instructd_pb2 as pb
from instructd.v1 import instructd_pb2_grpc as pb_grpc

USER = {"role": "user", "content": "Say hi."}


@pytest.mark.parametrize("messages, options, says", [
    ([], {}, "messages must not be empty"),
    ([{"role": "user", "content": "   "}], {}, "content must not be empty"),
    ([{"role": "robot", "content": "hi"}], {}, "role must be one of"),
    ([USER], {"temperature": 2.5}, "temperature"),
    ([USER], {"temperature": -1}, "temperature"),
    ([USER], {"top_p": 0}, "top_p"),
    ([USER], {"top_p": 1.5}, "top_p"),
    ([USER], {"max_tokens": 0}, "max_tokens"),
    ([USER], {"max_tokens": 5000}, "does not fit"),
    ([USER], {"stop": [""]}, "stop"),
    ([USER], {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ([{"role": "user", "content": "word " * 1500}], {}, "context"),
])
@pytest.mark.parametrize("streaming", [False, True])
def test_invalid_generation_requests(client, messages, options, says, streaming):
    with pytest.raises(ApiError) as error:
        if streaming:
            list(client.stream(messages, **options))
        else:
            client.generate(messages, **options)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert says in error.value.details


def test_feedback_for_an_unknown_response_is_not_found(client):
    with pytest.raises(ApiError) as error:
        client.feedback("no-such-response", "up")
    assert error.value.code == grpc.StatusCode.NOT_FOUND


def test_feedback_without_a_valid_rating_is_invalid(server, client):
    answer = client.generate("Say hi.", max_tokens=4)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.FeedbackStub(channel)
        for request in (pb.FeedbackRequest(response_id=answer.response_id),
                        pb.FeedbackRequest(response_id=answer.response_id, rating=7),
                        pb.FeedbackRequest(rating=pb.RATING_UP)):
            with pytest.raises(grpc.RpcError) as error:
                stub.Submit(request)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_invalid_metadata_json_is_refused(server):
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.AdminStub(channel).RegisterAdapter(pb.RegisterAdapterRequest(path="x", metadata_json="{"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_server_still_serves_after_bad_input(client):
    assert client.generate("Say hi.", max_tokens=4).text
