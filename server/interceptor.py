"""The one server interceptor every call passes: it authenticates the key, checks the role and the key's rate
limit, refuses malformed protobuf, and turns the outcome into a status (named errors into theirs, anything
else into INTERNAL), counted and timed. Servicers only translate; they never see a call they may not serve."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time

import grpc
from google.protobuf.message import DecodeError

from instructd.v1.metadata import AUTHORIZATION, RETRY_AFTER, RETRY_PUSHBACK_MS

from .auth import OPEN_SERVICES, Keyring, Principal, Role, authorize
from .errors import InstructdError, InvalidRequest, ResourceExhausted
from .limits import RateLimiter
from .metrics import Metrics

log = logging.getLogger(__name__)
CALLER: contextvars.ContextVar[Principal] = contextvars.ContextVar("instructd_caller")
NO_AUTH = Principal("", "default", Role.ADMIN)  # every caller, when the server runs with auth off


class Malformed:
    """Stands in for a request that did not parse, so the call answers INVALID_ARGUMENT, not UNKNOWN."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class CallGate(grpc.aio.ServerInterceptor):
    """`keyring` None: auth is off, every caller is an admin. `rate_limits`: method path -> its limiter, which
    applies to application keys (tuner and admin keys are the operator's own)."""

    def __init__(self, keyring: Keyring | None, rate_limits: dict[str, RateLimiter], metrics: Metrics) -> None:
        self._keyring, self._rate_limits, self._metrics = keyring, rate_limits, metrics
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}  # wrapped once per method, then reused

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        method = details.method
        if method not in self._handlers:
            handler = await continuation(details)
            if handler is None or method.startswith(OPEN_SERVICES):
                return handler
            self._handlers[method] = self._wrap(method, handler)
        return self._handlers[method]

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kind = {(False, False): "unary_unary", (False, True): "unary_stream", (True, False): "stream_unary",
                (True, True): "stream_stream"}[(handler.request_streaming, handler.response_streaming)]
        inner = getattr(handler, kind)
        if inspect.isasyncgenfunction(inner):  # reflection: check the key, nothing more
            return handler._replace(**{kind: self._key_checked_generator(method, inner)})
        parse = _strict if handler.request_streaming else _tolerant  # streamed requests are parsed in the handler
        return handler._replace(**{kind: self._coroutine(method, inner),
                                   "request_deserializer": parse(handler.request_deserializer)})

    def _caller(self, method: str, context: grpc.aio.ServicerContext, request) -> Principal:
        if self._keyring is None:
            principal = NO_AUTH
        else:
            principal = self._keyring.authenticate(dict(context.invocation_metadata() or ()).get(AUTHORIZATION))
        if isinstance(request, Malformed):
            raise InvalidRequest(f"malformed request: {request.error}"[:200])
        authorize(principal, method, request)
        if principal.role is Role.APP and method in self._rate_limits:
            self._rate_limits[method].take(principal.key_id or principal.app_id)
        return principal

    def _coroutine(self, method: str, inner):
        counted = _Counted(self._metrics, method.rsplit("/", 1)[-1])

        async def behaviour(request, context):
            with _Outcome(counted) as outcome:
                try:
                    CALLER.set(self._caller(method, context, request))
                    return await inner(request, context)
                except BaseException as exc:
                    await outcome.fail(context, exc)
        return behaviour

    def _key_checked_generator(self, method: str, inner):
        async def behaviour(requests, context):
            try:
                CALLER.set(self._caller(method, context, None))
            except InstructdError as exc:
                await context.abort(exc.code, str(exc))
            async for response in inner(requests, context):
                yield response
        return behaviour


def _tolerant(deserialize):
    """A unary request is parsed before the handler runs: a malformed one becomes a Malformed for it to refuse."""
    def parse(data: bytes):
        try:
            return deserialize(data)
        except DecodeError as exc:  # also invalid UTF-8 in a string field
            return Malformed(exc)
    return parse


def _strict(deserialize):
    """Each message of a request stream is parsed as the handler reads it: a malformed one raises there."""
    def parse(data: bytes):
        try:
            return deserialize(data)
        except DecodeError as exc:
            raise InvalidRequest(f"malformed request: {exc}"[:200]) from exc
    return parse


class _Counted:
    """One method's metric series, looked up once (a label lookup takes a lock: measurable at thousands of calls
    a second)."""

    def __init__(self, metrics: Metrics, method: str) -> None:
        self.method, self._requests = method, metrics.requests
        self.in_flight = metrics.in_flight.labels(method)
        self.seconds = metrics.request_seconds.labels(method)
        self._by_code: dict[grpc.StatusCode, object] = {}

    def finished(self, code: grpc.StatusCode, seconds: float) -> None:
        self.in_flight.dec()
        if code not in self._by_code:
            self._by_code[code] = self._requests.labels(self.method, code.name)
        self._by_code[code].inc()
        self.seconds.observe(seconds)


class _Outcome:
    """Times a call, counts it by status code, and turns raised errors into gRPC statuses."""

    def __init__(self, counted: _Counted) -> None:
        self.counted, self.method, self.code = counted, counted.method, grpc.StatusCode.OK

    def __enter__(self) -> _Outcome:
        self.started = time.perf_counter()
        self.counted.in_flight.inc()
        return self

    async def fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):  # the client cancelled, or its deadline passed
            left = context.time_remaining()
            self.code = grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left < 0.01 \
                else grpc.StatusCode.CANCELLED
            raise exc
        if isinstance(exc, grpc.aio.AbortError):
            self.code = context.code() or grpc.StatusCode.UNKNOWN
            raise exc
        if isinstance(exc, InstructdError):
            self.code = exc.code
            trailing = ()
            if isinstance(exc, ResourceExhausted):
                trailing = ((RETRY_AFTER, f"{max(1, round(exc.retry_after))}"),
                            (RETRY_PUSHBACK_MS, f"{round(exc.retry_after * 1000)}"))
            await context.abort(exc.code, str(exc), trailing)
        self.code = grpc.StatusCode.INTERNAL
        log.exception("%s failed", self.method, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {self.method}; see the server log")

    def __exit__(self, *_) -> None:
        self.counted.finished(self.code, time.perf_counter() - self.started)
