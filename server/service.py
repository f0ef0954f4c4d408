"""gRPC servicers: they only translate protobuf to domain calls and back. Who may call, malformed requests,
and errors into statuses are the interceptor's (interceptor.py); the caller is `CALLER.get()`."""

from __future__ import annotations

from instructd.v1 import instructd_pb2 as pb
from instructd.v1 import instructd_pb2_grpc as pb_grpc
from instructd.v1.metadata import AUTHORIZATION, RESPONSE_ID

from .access import Access
from .auth import Role
from .domain import Audit, FeedbackInput, GenerationRequest, Limits, json_object
from .errors import InvalidRequest
from .inference import Inference
from .interceptor import CALLER
from .metrics import Metrics
from .peers import Peers
from .router import AdapterRouter
from .store import Store

_DEFAULT_AUDIT_LIMIT, _DEFAULT_RUNS_LIMIT = 50, 5


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, inference: Inference, limits: Limits) -> None:
        self.inference, self.limits = inference, limits

    def _request(self, request: pb.GenerateRequest) -> GenerationRequest:
        caller = CALLER.get()
        return GenerationRequest.from_pb(request, self.limits, caller.app_id, caller.key_id)

    async def Generate(self, request, context):
        completion = await self.inference.run(self._request(request), self.inference.new_response_id())
        return completion.to_pb()

    async def GenerateStream(self, request, context):
        """Writes deltas as they come, not as an async generator: a generator the client abandons is closed
        only when garbage-collected, and with it the engine request; this coroutine is cancelled at once."""
        generation, response_id = self._request(request), self.inference.new_response_id()
        await context.send_initial_metadata(((RESPONSE_ID, response_id),))

        async def emit(text: str) -> None:
            await context.write(pb.GenerateStreamResponse(delta=text))

        completion = await self.inference.run(generation, response_id, emit)
        await context.write(pb.GenerateStreamResponse(final=completion.to_pb()))


class FeedbackServicer(pb_grpc.FeedbackServicer):
    def __init__(self, store: Store, metrics: Metrics, limits: Limits, peers: Peers) -> None:
        self.store, self.metrics, self.limits, self.peers = store, metrics, limits, peers

    async def Submit(self, request, context):
        caller = CALLER.get()
        feedback = FeedbackInput.from_pb(request, self.limits, caller.app_id, caller.key_id)
        owner = self.peers.owner(feedback.response_id)
        if owner:  # another replica's answer: it decides, with the caller's own key
            return await self.peers.forward_feedback(owner, request,
                                                     dict(context.invocation_metadata() or ()).get(AUTHORIZATION))
        feedback_id, replaced, version = await self.store.record_feedback(feedback)
        self.metrics.count_feedback(feedback.rating, version)
        return pb.FeedbackResponse(feedback_id=feedback_id, replaced=replaced)


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, router: AdapterRouter, store: Store) -> None:
        self.router, self.store = router, store

    async def ListAdapters(self, request, context):
        adapters = await self.store.list_adapters()
        return pb.ListAdaptersResponse(adapters=[a.to_pb() for a in adapters],
                                       promoted_version=self.router.promoted_version, canary=self._canary())

    async def RegisterAdapter(self, request, context):
        metadata = json_object(request.metadata_json, "metadata_json")
        record = await self.router.register(request.path, request.parent_version, metadata, request.rejected,
                                            CALLER.get())
        return record.to_pb()

    async def Promote(self, request, context):
        expected = request.expected_current if request.HasField("expected_current") else None
        if request.canary:
            previous = self.router.promoted_version
            await self.router.start_canary(request.version, expected, CALLER.get())
        else:
            previous = await self.router.promote(request.version, expected, CALLER.get())
        return pb.PromoteResponse(previous_version=previous, promoted_version=self.router.promoted_version,
                                  canary=self._canary())

    async def Rollback(self, request, context):
        version = request.version if request.HasField("version") else None
        expected = request.expected_current if request.HasField("expected_current") else None
        previous, now = await self.router.rollback(version, expected, CALLER.get())
        return pb.PromoteResponse(previous_version=previous, promoted_version=now)

    async def RecordEvaluation(self, request, context):
        if not request.HasField("verdict"):
            raise InvalidRequest("verdict must be set")
        return (await self.store.record_evaluation(request.version, request.verdict, CALLER.get())).to_pb()

    async def TriggerTuning(self, request, context):
        await self.store.request_tuning(CALLER.get())
        return await self._tuning_status(_DEFAULT_RUNS_LIMIT)

    async def GetTuningStatus(self, request, context):
        return await self._tuning_status(request.limit or _DEFAULT_RUNS_LIMIT)

    async def _tuning_status(self, limit: int) -> pb.TuningStatus:
        state = await self.store.tuning_status(min(limit, 1000))
        return pb.TuningStatus(runs=[r.to_pb() for r in state.runs], requested=state.requested,
                               promoted_version=self.router.promoted_version, newest_cursor=state.newest_cursor,
                               learnt_until=state.learnt_until, canary=self._canary())

    def _canary(self) -> pb.Canary | None:
        if not (c := self.router.canary):
            return None
        t, mode = c.tally, self.router.canary_mode.value
        return pb.Canary(version=c.record.version, incumbent_version=c.record.incumbent, mode=mode,
                         share=c.record.share, started_at=c.record.started_at, candidate_up=t.candidate_up,
                         candidate_down=t.candidate_down, incumbent_up=t.incumbent_up,
                         incumbent_down=t.incumbent_down, users_exposed=len(c.users), p_no_worse=c.p_no_worse,
                         p_worse=c.p_worse, call=c.call.value)

    async def GetStats(self, request, context):
        caller = CALLER.get()
        rows = await self.store.stats(None if caller.role is Role.ADMIN else caller.app_id)
        return pb.GetStatsResponse(adapters=[pb.AdapterStats(**r) for r in rows],
                                   promoted_version=self.router.promoted_version)


class AccessServicer(pb_grpc.AccessServicer):
    def __init__(self, access: Access, store: Store) -> None:
        self.access, self.store = access, store

    async def CreateKey(self, request, context):
        record, secret = await self.access.create_key(request.app_id, request.role, request.name, CALLER.get(),
                                                      request.secret)
        return pb.CreatedKey(key=record.to_pb(), secret=secret)

    async def ListKeys(self, request, context):
        return pb.ListKeysResponse(keys=[k.to_pb() for k in await self.access.list_keys()])

    async def RevokeKey(self, request, context):
        return (await self.access.revoke_key(request.id, CALLER.get())).to_pb()

    async def ListAudit(self, request, context):
        events = await self.store.list_audit(min(request.limit or _DEFAULT_AUDIT_LIMIT, 10_000))
        return pb.ListAuditResponse(events=[pb.AuditEvent(
            id=e["id"], at=e["at"], key_id=e["key_id"], app_id=e["app_id"], action=Audit[e["action"].upper()].value,
            target=e["target"]) for e in events])

    async def Forget(self, request, context):
        exchanges, ratings = await self.store.forget(request.app_id, request.user_id, CALLER.get())
        return pb.ForgetResponse(exchanges=exchanges, ratings=ratings)
