"""gRPC servicers: they only translate protobuf to domain calls and back, and errors to statuses."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time

import grpc

from instructd.v1 import instructd_pb2 as pb
from instructd.v1 import instructd_pb2_grpc as pb_grpc

from .domain import Completion, FeedbackInput, GenerationRequest
from .errors import InstructdError, InvalidRequest
from .inference import Inference
from .metrics import Metrics
from .router import AdapterRouter
from .store import Store

log = logging.getLogger(__name__)
APP_ID_HEADER = "x-instructd-app"  # request metadata naming the calling application


class _Outcome:
    """Times a call, counts it by status code, and turns raised errors into gRPC statuses."""

    def __init__(self, metrics: Metrics, method: str) -> None:
        self.metrics, self.method, self.code = metrics, method, grpc.StatusCode.OK

    def __enter__(self) -> _Outcome:
        self.started = time.perf_counter()
        self.metrics.in_flight.labels(self.method).inc()
        return self

    async def fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            self.code = grpc.StatusCode.CANCELLED
            raise exc
        if isinstance(exc, InstructdError):
            self.code = exc.code
            await context.abort(exc.code, str(exc))
        self.code = grpc.StatusCode.INTERNAL
        log.exception("%s failed", self.method, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {self.method}; see the server log")

    def __exit__(self, *_) -> None:
        self.metrics.in_flight.labels(self.method).dec()
        self.metrics.requests.labels(self.method, self.code.name).inc()
        self.metrics.request_seconds.labels(self.method).observe(time.perf_counter() - self.started)


def unary(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        with _Outcome(self.metrics, method.__name__) as outcome:
            try:
                return await method(self, request, context)
            except BaseException as exc:
                await outcome.fail(context, exc)
    return wrapper


def streaming(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        with _Outcome(self.metrics, method.__name__) as outcome:
            try:
                async for message in method(self, request, context):
                    yield message
            except BaseException as exc:
                await outcome.fail(context, exc)
    return wrapper


def _app_id(context: grpc.aio.ServicerContext) -> str:
    return dict(context.invocation_metadata() or ()).get(APP_ID_HEADER, "default")


def _json_object(text: str, field: str) -> dict:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{field} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidRequest(f"{field} must be a JSON object")
    return value


def _tuning_run_pb(row: dict) -> pb.TuningRun:
    return pb.TuningRun(
        id=row["id"], status=row["status"], trigger=row["trigger"] or "", started_at=row["started_at"] or "",
        finished_at=row["finished_at"] or "", step=row["step"] or 0, total_steps=row["total_steps"] or 0,
        loss=row["loss"] or 0.0, examples=row["examples"] or 0, candidate_version=row["candidate_version"] or 0,
        detail_json=row["metadata_json"] or "{}")


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, inference: Inference, metrics: Metrics) -> None:
        self.inference, self.metrics = inference, metrics

    @unary
    async def Generate(self, request, context):
        completion = await self.inference.generate(GenerationRequest.from_pb(request, _app_id(context)))
        return completion.to_pb()

    @streaming
    async def GenerateStream(self, request, context):
        async for event in self.inference.stream(GenerationRequest.from_pb(request, _app_id(context))):
            if isinstance(event, Completion):
                yield pb.GenerateStreamResponse(final=event.to_pb())
            else:
                yield pb.GenerateStreamResponse(delta=event)


class FeedbackServicer(pb_grpc.FeedbackServicer):
    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store, self.metrics = store, metrics

    @unary
    async def Submit(self, request, context):
        feedback = FeedbackInput.from_pb(request)
        feedback_id, replaced, version = await self.store.record_feedback(feedback)
        self.metrics.feedback.labels(feedback.rating, str(version)).inc()
        return pb.FeedbackResponse(feedback_id=feedback_id, replaced=replaced)


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, router: AdapterRouter, store: Store, metrics: Metrics) -> None:
        self.router, self.store, self.metrics = router, store, metrics

    @unary
    async def ListAdapters(self, request, context):
        adapters = await self.store.list_adapters()
        return pb.ListAdaptersResponse(adapters=[a.to_pb() for a in adapters],
                                       promoted_version=self.router.promoted_version)

    @unary
    async def RegisterAdapter(self, request, context):
        metadata = _json_object(request.metadata_json, "metadata_json")
        record = await self.router.register(request.path, request.parent_version, metadata, request.rejected)
        return record.to_pb()

    @unary
    async def Promote(self, request, context):
        expected = request.expected_current if request.HasField("expected_current") else None
        previous = await self.router.promote(request.version, expected)
        return pb.PromoteResponse(previous_version=previous, promoted_version=self.router.promoted_version)

    @unary
    async def Rollback(self, request, context):
        previous, now = await self.router.rollback(request.version if request.HasField("version") else None)
        return pb.PromoteResponse(previous_version=previous, promoted_version=now)

    @unary
    async def RecordEvaluation(self, request, context):
        record = await self.store.record_evaluation(request.version, _json_object(request.scores_json, "scores_json"),
                                                    request.passed)
        return record.to_pb()

    @unary
    async def TriggerTuning(self, request, context):
        await self.store.request_tuning()
        return await self._tuning_status(5)

    @unary
    async def GetTuningStatus(self, request, context):
        return await self._tuning_status(request.limit or 5)

    async def _tuning_status(self, limit: int) -> pb.TuningStatus:
        runs, requested = await self.store.tuning_status(limit)
        return pb.TuningStatus(runs=[_tuning_run_pb(r) for r in runs], requested=requested,
                               promoted_version=self.router.promoted_version)

    @unary
    async def GetStats(self, request, context):
        rows = await self.store.stats()
        return pb.GetStatsResponse(adapters=[pb.AdapterStats(**r) for r in rows],
                                   promoted_version=self.router.promoted_version)
