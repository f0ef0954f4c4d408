"""What the store keeps about adapter versions and tuning runs, with their statuses as enums (stored by name,
sent as the proto's enums) and the gate's verdict and a run's data as the proto's own messages."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field

from google.protobuf import json_format

from instructd.v1 import instructd_pb2 as pb


class _Stored(enum.Enum):
    """An enum stored in SQLite by its lowercase name, and sent as its proto value."""

    @property
    def stored(self) -> str:
        return self.name.lower()

    @classmethod
    def from_stored(cls, name: str):
        return cls[name.upper()]


class AdapterStatus(_Stored):
    REGISTERED = pb.ADAPTER_REGISTERED
    PROMOTED = pb.ADAPTER_PROMOTED
    RETIRED = pb.ADAPTER_RETIRED
    ROLLED_BACK = pb.ADAPTER_ROLLED_BACK
    REJECTED = pb.ADAPTER_REJECTED
    CANARY = pb.ADAPTER_CANARY


class RunOutcome(_Stored):
    RUNNING = pb.RUN_RUNNING
    PROMOTED = pb.RUN_PROMOTED
    REJECTED = pb.RUN_REJECTED
    FAILED = pb.RUN_FAILED
    SKIPPED = pb.RUN_SKIPPED


class RunTrigger(_Stored):
    REQUESTED = pb.TRIGGER_REQUESTED
    THRESHOLD = pb.TRIGGER_THRESHOLD
    PERIOD = pb.TRIGGER_PERIOD


JUDGED = (RunOutcome.PROMOTED, RunOutcome.REJECTED)  # runs that may use their ratings up: those that record how far
# they read (a promotion, a suspected poisoning); one rejected for too little evidence records nothing, and keeps them


def message_to_json(message) -> str:
    """A proto message as the store keeps it (None and empty: '')."""
    return json_format.MessageToJson(message, indent=None) if message is not None and message.ByteSize() else ""


def message_from_json(text: str | None, kind):
    return json_format.Parse(text, kind()) if text else None


@dataclass
class AdapterRecord:
    """A registry row: one immutable adapter version."""

    version: int
    path: str
    base_model: str
    parent_version: int = 0
    status: AdapterStatus = AdapterStatus.REGISTERED
    created_at: str = ""
    promoted_at: str = ""
    metadata: dict = field(default_factory=dict)
    created_by_key: str = ""
    app_id: str = ""
    sha256: str = ""
    evaluation: pb.Verdict | None = None

    @classmethod
    def from_row(cls, row: dict) -> AdapterRecord:
        return cls(row["version"], row["path"], row["base_model"], row["parent_version"] or 0,
                   AdapterStatus.from_stored(row["status"]), row["created_at"] or "", row["promoted_at"] or "",
                   json.loads(row["metadata_json"] or "{}"), row["created_by_key"] or "", row["app_id"] or "",
                   row["sha256"] or "", message_from_json(row["verdict_json"], pb.Verdict))

    def to_row(self) -> dict:
        return {"version": self.version, "path": self.path, "base_model": self.base_model,
                "parent_version": self.parent_version, "status": self.status.stored, "created_at": self.created_at,
                "promoted_at": self.promoted_at, "metadata_json": json.dumps(self.metadata, sort_keys=True),
                "created_by_key": self.created_by_key, "app_id": self.app_id, "sha256": self.sha256,
                "verdict_json": message_to_json(self.evaluation)}

    def to_pb(self) -> pb.Adapter:
        return pb.Adapter(
            version=self.version, path=self.path, base_model=self.base_model, parent_version=self.parent_version,
            status=self.status.value, created_at=self.created_at, promoted_at=self.promoted_at,
            metadata_json=json.dumps(self.metadata, sort_keys=True), created_by_key=self.created_by_key,
            app_id=self.app_id, sha256=self.sha256, evaluation=self.evaluation)


@dataclass
class RunRecord:
    """One tuning run, as the tuner reported it through the API."""

    id: int
    outcome: RunOutcome
    trigger: RunTrigger
    started_at: str
    finished_at: str = ""
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    examples: int = 0
    candidate_version: int = 0
    data: pb.DataSummary | None = None
    verdict: pb.Verdict | None = None
    reason: str = ""
    data_until: int = 0
    key_id: str = ""
    app_id: str = ""

    @classmethod
    def from_row(cls, row: dict) -> RunRecord:
        return cls(row["id"], RunOutcome.from_stored(row["status"]), RunTrigger.from_stored(row["trigger"]),
                   row["started_at"], row["finished_at"] or "", row["step"] or 0, row["total_steps"] or 0,
                   row["loss"] or 0.0, row["examples"] or 0, row["candidate_version"] or 0,
                   message_from_json(row["data_json"], pb.DataSummary),
                   message_from_json(row["verdict_json"], pb.Verdict), row["reason"] or "", row["cursor"] or 0,
                   row["created_by_key"] or "", row["app_id"] or "")

    def to_pb(self) -> pb.TuningRun:
        return pb.TuningRun(
            id=self.id, outcome=self.outcome.value, trigger=self.trigger.value, started_at=self.started_at,
            finished_at=self.finished_at, step=self.step, total_steps=self.total_steps, loss=self.loss,
            examples=self.examples, candidate_version=self.candidate_version, data=self.data, verdict=self.verdict,
            reason=self.reason, data_until=self.data_until, key_id=self.key_id, app_id=self.app_id)
