"""Typed Python clients for instructd, blocking (`Client`) and asyncio (`AsyncClient`).

    with Client("localhost:50051", api_key="ik_...") as c:
        answer = c.generate("Give three tips for staying healthy.")
        c.feedback(answer.response_id, "up")

The key: `api_key`, else $INSTRUCTD_API_KEY, else (for a server on this machine) the admin key that
`instructd serve` wrote into its data directory. TLS: `tls=Tls(ca=...)`, or $INSTRUCTD_TLS_CA.
Calls refused as RESOURCE_EXHAUSTED or UNAVAILABLE are retried by gRPC itself, with backoff and the
server's pushback (a service config, not a loop of ours).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Iterator

import grpc

from instructd.v1 import instructd_pb2 as pb
from instructd.v1 import instructd_pb2_grpc as pb_grpc

from . import requests
from .channel import Tls, channel
from .types import Adapter, Answer, ApiError, ApiKey, AuditEvent, Canary, Promotion, Stats, TuningRun, TuningStatus


class _Stubs:
    def __init__(self, target: str | None, api_key: str | None, tls: Tls | None, timeout: float | None,
                 aio: bool) -> None:
        self.channel, self.metadata = channel(target, api_key, tls, aio)
        self._inference = pb_grpc.InferenceStub(self.channel)
        self._feedback = pb_grpc.FeedbackStub(self.channel)
        self._admin = pb_grpc.AdminStub(self.channel)
        self._access = pb_grpc.AccessStub(self.channel)
        self.timeout = timeout


class Client(_Stubs):
    """Blocking client. Every method raises ApiError on failure."""

    def __init__(self, target: str | None = None, *, api_key: str | None = None, tls: Tls | None = None,
                 timeout: float | None = 300) -> None:
        super().__init__(target, api_key, tls, timeout, aio=False)

    def _call(self, rpc, request):
        try:
            return rpc(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as error:
            raise ApiError.from_rpc(error) from None

    def generate(self, messages: requests.Messages, **options) -> Answer:
        """Answers a prompt or conversation; options as in `requests.generate`."""
        return Answer.from_pb(self._call(self._inference.Generate, requests.generate(messages, **options)))

    def stream(self, messages: requests.Messages, **options) -> Iterator[str | Answer]:
        """Yields text deltas, then the final Answer. Closing the iterator early cancels generation."""
        call = self._inference.GenerateStream(requests.generate(messages, **options), metadata=self.metadata,
                                             timeout=self.timeout)
        try:
            for event in call:
                yield event.delta if event.WhichOneof("event") == "delta" else Answer.from_pb(event.final)
        except grpc.RpcError as error:
            raise ApiError.from_rpc(error) from None
        finally:
            call.cancel()

    def feedback(self, response_id: str, rating: str, **options) -> str:
        """Rates an answer "up" or "down"; returns the feedback id once it is committed."""
        return self._call(self._feedback.Submit, requests.feedback(response_id, rating, **options)).feedback_id

    def adapters(self) -> tuple[list[Adapter], int]:
        """Every adapter version (newest first) and the version now serving (0: base)."""
        reply = self._call(self._admin.ListAdapters, pb.ListAdaptersRequest())
        return [Adapter.from_pb(a) for a in reply.adapters], reply.promoted_version

    def register(self, path: str, **options) -> Adapter:
        return Adapter.from_pb(self._call(self._admin.RegisterAdapter, requests.register(path, **options)))

    def promote(self, version: int, expected_current: int | None = None, canary: bool = False) -> Promotion:
        """Serves `version`; with `canary`, to the server's canary share of users first (see Canary)."""
        return Promotion.from_pb(self._call(self._admin.Promote, requests.promote(version, expected_current, canary)))

    def canary(self) -> Canary | None:
        """The canary in progress, None if none is."""
        return Canary.of(self._call(self._admin.ListAdapters, pb.ListAdaptersRequest()))

    def rollback(self, version: int | None = None, expected_current: int | None = None) -> Promotion:
        return Promotion.from_pb(self._call(self._admin.Rollback, requests.rollback(version, expected_current)))

    def stats(self) -> Stats:
        return Stats.from_pb(self._call(self._admin.GetStats, pb.GetStatsRequest()))

    def record_evaluation(self, version: int, verdict: pb.Verdict) -> Adapter:
        """Stores a candidate's verdict; verdict.passed False rejects it for good."""
        return Adapter.from_pb(self._call(self._admin.RecordEvaluation,
                                          pb.RecordEvaluationRequest(version=version, verdict=verdict)))

    def trigger_tuning(self) -> TuningStatus:
        return TuningStatus.from_pb(self._call(self._admin.TriggerTuning, pb.TriggerTuningRequest()))

    def tuning_status(self, limit: int = 5) -> TuningStatus:
        return TuningStatus.from_pb(self._call(self._admin.GetTuningStatus, pb.GetTuningStatusRequest(limit=limit)))

    def create_key(self, app_id: str, role: str, name: str = "", secret: str = "") -> tuple[ApiKey, str]:
        """A new key for `app_id` with `role` ("app", "tuner" or "admin"): its record and its secret (shown once).
        With `secret` (a key made on another replica): that key, registered here too."""
        reply = self._call(self._access.CreateKey, requests.create_key(app_id, role, name, secret))
        return ApiKey.from_pb(reply.key), reply.secret

    def keys(self) -> list[ApiKey]:
        return [ApiKey.from_pb(k) for k in self._call(self._access.ListKeys, pb.ListKeysRequest()).keys]

    def revoke_key(self, key_id: str) -> ApiKey:
        return ApiKey.from_pb(self._call(self._access.RevokeKey, pb.RevokeKeyRequest(id=key_id)))

    def audit(self, limit: int = 50) -> list[AuditEvent]:
        reply = self._call(self._access.ListAudit, pb.ListAuditRequest(limit=limit))
        return [AuditEvent.from_pb(e) for e in reply.events]

    def forget(self, app_id: str, user_id: str) -> tuple[int, int]:
        """Deletes a user's exchanges and ratings in an application; returns how many of each."""
        reply = self._call(self._access.Forget, pb.ForgetRequest(app_id=app_id, user_id=user_id))
        return reply.exchanges, reply.ratings

    def follow_run(self, after_id: int = 0, timeout: float | None = None) -> TuningRun:
        """Waits for the newest tuning run after `after_id` to end, with a progress bar; returns it."""
        from tqdm import tqdm

        deadline, bar = time.monotonic() + (timeout if timeout is not None else math.inf), None
        while time.monotonic() < deadline:
            runs = self.tuning_status(limit=1).runs
            if runs and runs[0].id > after_id:
                run = runs[0]
                if bar is None:
                    bar = tqdm(total=run.total_steps or None, desc=f"tuning run {run.id}", unit="step")
                bar.total, bar.n = run.total_steps or bar.total, run.step
                bar.set_postfix_str(f"{run.status}, loss {run.loss:.4f}" if run.step else run.status)
                bar.refresh()
                if run.status != "running":
                    bar.close()
                    return run
            time.sleep(1)  # the tuner is another process: poll its status
        raise TimeoutError(f"no tuning run finished within {timeout:.0f}s")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_) -> None:
        self.close()


class AsyncClient(_Stubs):
    """asyncio client with the same methods as Client, as coroutines."""

    def __init__(self, target: str | None = None, *, api_key: str | None = None, tls: Tls | None = None,
                 timeout: float | None = 300) -> None:
        super().__init__(target, api_key, tls, timeout, aio=True)

    async def _call(self, rpc, request):
        try:
            return await rpc(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as error:
            raise ApiError.from_rpc(error) from None

    async def generate(self, messages: requests.Messages, **options) -> Answer:
        return Answer.from_pb(await self._call(self._inference.Generate, requests.generate(messages, **options)))

    async def stream(self, messages: requests.Messages, **options) -> AsyncIterator[str | Answer]:
        call = self._inference.GenerateStream(requests.generate(messages, **options), metadata=self.metadata,
                                             timeout=self.timeout)
        try:
            async for event in call:
                yield event.delta if event.WhichOneof("event") == "delta" else Answer.from_pb(event.final)
        except grpc.RpcError as error:
            raise ApiError.from_rpc(error) from None
        finally:
            call.cancel()

    async def feedback(self, response_id: str, rating: str, **options) -> str:
        reply = await self._call(self._feedback.Submit, requests.feedback(response_id, rating, **options))
        return reply.feedback_id

    async def adapters(self) -> tuple[list[Adapter], int]:
        reply = await self._call(self._admin.ListAdapters, pb.ListAdaptersRequest())
        return [Adapter.from_pb(a) for a in reply.adapters], reply.promoted_version

    async def register(self, path: str, **options) -> Adapter:
        return Adapter.from_pb(await self._call(self._admin.RegisterAdapter, requests.register(path, **options)))

    async def promote(self, version: int, expected_current: int | None = None, canary: bool = False) -> Promotion:
        return Promotion.from_pb(await self._call(self._admin.Promote,
                                                  requests.promote(version, expected_current, canary)))

    async def rollback(self, version: int | None = None, expected_current: int | None = None) -> Promotion:
        return Promotion.from_pb(await self._call(self._admin.Rollback, requests.rollback(version, expected_current)))

    async def stats(self) -> Stats:
        return Stats.from_pb(await self._call(self._admin.GetStats, pb.GetStatsRequest()))

    async def record_evaluation(self, version: int, verdict: pb.Verdict) -> Adapter:
        return Adapter.from_pb(await self._call(self._admin.RecordEvaluation,
                                                pb.RecordEvaluationRequest(version=version, verdict=verdict)))

    async def trigger_tuning(self) -> TuningStatus:
        return TuningStatus.from_pb(await self._call(self._admin.TriggerTuning, pb.TriggerTuningRequest()))

    async def tuning_status(self, limit: int = 5) -> TuningStatus:
        return TuningStatus.from_pb(await self._call(self._admin.GetTuningStatus,
                                                     pb.GetTuningStatusRequest(limit=limit)))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_) -> None:
        await self.close()
