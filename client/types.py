"""Plain result types returned by the client, so callers never handle protobuf messages."""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc

from instructd.v1 import instructd_pb2 as pb


class ApiError(Exception):
    """A call failed; `code` is the gRPC status (e.g. INVALID_ARGUMENT), the message says why."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> ApiError:
        return cls(error.code(), error.details() or "")


@dataclass(frozen=True)
class Answer:
    """A generated answer. adapter_version 0 means the base model answered."""

    response_id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter_version: int

    @classmethod
    def from_pb(cls, m: pb.GenerateResponse) -> Answer:
        return cls(m.response_id, m.text, m.finish_reason, m.usage.prompt_tokens, m.usage.completion_tokens,
                   m.adapter_version)


def _name(enum, value: int, prefix: str) -> str:
    """A proto enum value as a plain lowercase name: ADAPTER_PROMOTED -> "promoted"."""
    return enum.Name(value).removeprefix(prefix).lower()


@dataclass(frozen=True)
class Adapter:
    """A registered adapter version; status is "registered", "canary", "promoted", "retired", "rolled_back" or
    "rejected";
    evaluation is the gate's verdict (typed: .passed, .reason, .candidate_suite, ...), None before one."""

    version: int
    path: str
    base_model: str
    parent_version: int
    status: str
    created_at: str
    promoted_at: str
    metadata: dict
    created_by_key: str = ""
    app_id: str = ""
    sha256: str = ""
    evaluation: pb.Verdict | None = None

    @classmethod
    def from_pb(cls, m: pb.Adapter) -> Adapter:
        return cls(m.version, m.path, m.base_model, m.parent_version, _name(pb.AdapterStatus, m.status, "ADAPTER_"),
                   m.created_at, m.promoted_at, json.loads(m.metadata_json or "{}"), m.created_by_key, m.app_id,
                   m.sha256, m.evaluation if m.HasField("evaluation") else None)


@dataclass(frozen=True)
class AdapterStats:
    """Exchanges and ratings of one adapter version (0: the base model) in one application."""

    adapter_version: int
    exchanges: int
    ratings_up: int
    ratings_down: int
    app_id: str = ""

    @property
    def up_rate(self) -> float | None:
        rated = self.ratings_up + self.ratings_down
        return self.ratings_up / rated if rated else None


@dataclass(frozen=True)
class Stats:
    adapters: list[AdapterStats]
    promoted_version: int

    @classmethod
    def from_pb(cls, m: pb.GetStatsResponse) -> Stats:
        rows = [AdapterStats(a.adapter_version, a.exchanges, a.ratings_up, a.ratings_down, a.app_id)
                for a in m.adapters]
        return cls(rows, m.promoted_version)


@dataclass(frozen=True)
class Canary:
    """A candidate serving a share of users beside the promoted version (the incumbent). mode: "auto", "manual" or
    "off"; call: what the live ratings say so far, "undecided", "no_worse" or "worse"."""

    version: int
    incumbent_version: int
    mode: str
    share: float
    started_at: str
    candidate_up: int
    candidate_down: int
    incumbent_up: int
    incumbent_down: int
    users_exposed: int
    p_no_worse: float
    p_worse: float
    call: str

    @classmethod
    def from_pb(cls, m: pb.Canary) -> Canary:
        return cls(m.version, m.incumbent_version, _name(pb.CanaryMode, m.mode, "CANARY_"), m.share, m.started_at,
                   m.candidate_up, m.candidate_down, m.incumbent_up, m.incumbent_down, m.users_exposed,
                   m.p_no_worse, m.p_worse, _name(pb.CanaryCall, m.call, "CANARY_"))

    @classmethod
    def of(cls, message) -> Canary | None:
        """The canary field of a reply, None when unset."""
        return cls.from_pb(message.canary) if message.HasField("canary") else None

    def describe(self) -> str:
        rate = lambda up, down: f"{up}/{up + down} 👍" if up + down else "no ratings"  # noqa: E731
        return (f"canary v{self.version} on {self.share:.0%} of users ({self.mode}): "
                f"{rate(self.candidate_up, self.candidate_down)} against "
                f"{rate(self.incumbent_up, self.incumbent_down)} for v{self.incumbent_version}, "
                f"{self.users_exposed} users, P(no worse) {self.p_no_worse:.2f}, P(worse) {self.p_worse:.2f}: "
                f"{self.call.replace('_', ' ')}")


@dataclass(frozen=True)
class Promotion:
    """The outcome of a promotion or rollback; `canary` is set when the version went to a canary instead."""

    previous_version: int
    promoted_version: int
    canary: Canary | None = None

    @classmethod
    def from_pb(cls, m: pb.PromoteResponse) -> Promotion:
        return cls(m.previous_version, m.promoted_version, Canary.of(m))


@dataclass(frozen=True)
class TuningRun:
    """One tuning run as the tuner reported it. status: "running", "promoted", "rejected", "failed" or
    "skipped"; trigger: "requested", "threshold" or "period"; data and verdict are typed (None until known)."""

    id: int
    status: str
    trigger: str
    started_at: str
    finished_at: str
    step: int
    total_steps: int
    loss: float
    examples: int
    candidate_version: int
    data: pb.DataSummary | None
    verdict: pb.Verdict | None
    reason: str
    data_until: int

    @classmethod
    def from_pb(cls, m: pb.TuningRun) -> TuningRun:
        return cls(m.id, _name(pb.RunOutcome, m.outcome, "RUN_"), _name(pb.RunTrigger, m.trigger, "TRIGGER_"),
                   m.started_at, m.finished_at, m.step, m.total_steps, m.loss, m.examples, m.candidate_version,
                   m.data if m.HasField("data") else None, m.verdict if m.HasField("verdict") else None,
                   m.reason, m.data_until)


@dataclass(frozen=True)
class TuningStatus:
    """The newest runs; whether a `tune --now` waits; and how many ratings arrived since judged runs learnt."""

    runs: list[TuningRun]
    requested: bool
    promoted_version: int
    newest_cursor: int = 0
    learnt_until: int = 0
    canary: Canary | None = None

    @property
    def new_ratings(self) -> int:
        return self.newest_cursor - self.learnt_until

    @classmethod
    def from_pb(cls, m: pb.TuningStatus) -> TuningStatus:
        return cls([TuningRun.from_pb(r) for r in m.runs], m.requested, m.promoted_version, m.newest_cursor,
                   m.learnt_until, Canary.of(m))


@dataclass(frozen=True)
class ApiKey:
    """An API key without its secret; role is "app", "tuner" or "admin"."""

    id: str
    app_id: str
    role: str
    name: str
    created_at: str
    last_used_at: str
    revoked_at: str

    @classmethod
    def from_pb(cls, m: pb.ApiKey) -> ApiKey:
        return cls(m.id, m.app_id, _name(pb.Role, m.role, "ROLE_"), m.name, m.created_at, m.last_used_at,
                   m.revoked_at)


@dataclass(frozen=True)
class AuditEvent:
    """One admin or tuner action; action is e.g. "promoted" or "key_created"."""

    id: int
    at: str
    key_id: str
    app_id: str
    action: str
    target: str

    @classmethod
    def from_pb(cls, m: pb.AuditEvent) -> AuditEvent:
        return cls(m.id, m.at, m.key_id, m.app_id, _name(pb.AuditAction, m.action, "AUDIT_"), m.target)
