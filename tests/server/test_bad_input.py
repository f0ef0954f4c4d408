"""Bad input gets a clear gRPC status, whose message never echoes more than a short prefix of it, and nothing
is stored; the server keeps serving."""

from __future__ import annotations

import grpc
import pytest

from instructd.client import ApiError
from instructd.v1 import instructd_pb2 as pb
from instructd.v1 import instructd_pb2_grpc as pb_grpc

USER = {"role": "user", "content": "Say hi."}
BIG = "x" * 100_000


@pytest.mark.parametrize("messages, options, says", [
    ([], {}, "messages must not be empty"),
    ([{"role": "user", "content": "   "}], {}, "content must not be empty"),
    ([{"role": "robot", "content": "hi"}], {}, "role must be one of"),
    ([{"role": BIG, "content": "hi"}], {}, "role must be one of"),
    ([USER] * 65, {}, "at most 64"),
    ([USER], {"temperature": 2.5}, "temperature"),
    ([USER], {"temperature": -1}, "temperature"),
    ([USER], {"top_p": 0}, "top_p"),
    ([USER], {"top_p": 1.5}, "top_p"),
    ([USER], {"max_tokens": 0}, "max_tokens"),
    ([USER], {"max_tokens": 5000}, "does not fit"),
    ([USER], {"stop": [""]}, "stop"),
    ([USER], {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ([USER], {"stop": ["s" * 65]}, "stop string"),
    ([USER], {"user_id": "u" * 129}, "user_id is longer than 128 bytes"),
    ([{"role": "user", "content": "word " * 1500}], {}, "context"),
    ([{"role": "user", "content": "word " * 20_000}], {}, "refused unread"),  # too long to be worth tokenizing
])
@pytest.mark.parametrize("streaming", [False, True])
def test_invalid_generation_requests(server, client, messages, options, says, streaming):
    before = server.db()["exchanges"].count
    with pytest.raises(ApiError) as error:
        if streaming:
            list(client.stream(messages, **options))
        else:
            client.generate(messages, **options)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert says in error.value.details and len(error.value.details) < 400
    assert server.db()["exchanges"].count == before


def test_a_request_over_the_size_limit_is_refused_before_it_is_parsed(client):
    with pytest.raises(ApiError) as error:
        client.generate("word " * 300_000)  # 1.5 MB: over the default 1 MiB
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("fields, says", [
    ({"response_id": ""}, "response_id must not be empty"),
    ({"rating": pb.RATING_UNSPECIFIED}, "rating"),
    ({"rating": 7}, "rating"),
    ({"response_id": BIG}, "response_id is longer than 64"),
    ({"user_id": BIG}, "user_id is longer than 128 bytes"),
    ({"comment": "c" * 2001}, "comment is 2001 characters"),
    ({"correction": "c" * 8001}, "correction is 8001 characters"),
])
def test_invalid_ratings(server, client, fields, says):
    answer = client.generate("Say hi.", max_tokens=4)
    request = pb.FeedbackRequest(**{"response_id": answer.response_id, "rating": pb.RATING_UP, **fields})
    before = server.db()["feedback"].count
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.FeedbackStub(channel).Submit(request, metadata=client.metadata)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in error.value.details() and len(error.value.details()) < 400
    assert server.db()["feedback"].count == before


def test_feedback_for_an_unknown_response_is_not_found(client):
    with pytest.raises(ApiError) as error:
        client.feedback("no-such-response", "up")
    assert error.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("raw", [
    b"\xff\xff\xff",                   # not protobuf at all
    b"\x0a\x05\x12\x03\xff\xfe\xfd",   # a message whose content is not UTF-8
    b"\x0a\x80",                       # truncated
])
@pytest.mark.parametrize("method", ["/instructd.v1.Inference/Generate", "/instructd.v1.Feedback/Submit",
                                    "/instructd.v1.Admin/RegisterAdapter"])
def test_malformed_protobuf_is_invalid_argument(server, admin, raw, method):
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as error:
            call(raw, metadata=admin.metadata)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in error.value.details()


def test_invalid_metadata_json_is_refused(server, admin):
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.AdminStub(channel).RegisterAdapter(pb.RegisterAdapterRequest(path="x", metadata_json="{"),
                                                       metadata=admin.metadata)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_server_still_serves_after_bad_input(client):
    assert client.generate("Say hi.", max_tokens=4).text
