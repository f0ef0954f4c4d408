"""Domain types of the service, built from protobuf (validating as they go) and turned back with to_pb()."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from instructd.v1 import instructd_pb2 as pb

from .errors import InvalidRequest

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4
BASE_VERSION = 0  # adapter version 0 stands for the base model
_RATINGS = {pb.RATING_UP: "up", pb.RATING_DOWN: "down"}


@dataclass(frozen=True)
class Sampling:
    """Sampling options with server defaults filled in; max_tokens None means 'as configured'."""

    max_tokens: int | None = None
    temperature: float = 0.7
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequest(f"temperature must be in [0, 2], got {self.temperature:g}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p:g}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise InvalidRequest(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")

    @classmethod
    def from_pb(cls, msg: pb.SamplingOptions) -> Sampling:
        given = {f.name: v for f, v in msg.ListFields()}
        if "stop" in given:
            given["stop"] = tuple(given["stop"])
        return cls(**given)


@dataclass(frozen=True)
class AdapterChoice:
    """Which model a request asked for: a version, the base, or (neither) the promoted one."""

    version: int | None = None
    base: bool = False

    @classmethod
    def from_pb(cls, msg: pb.AdapterSelector) -> AdapterChoice:
        target = msg.WhichOneof("target")
        if target == "version":
            if msg.version == BASE_VERSION:
                return cls(base=True)
            return cls(version=msg.version)
        return cls(base=target == "base" and msg.base)


@dataclass(frozen=True)
class GenerationRequest:
    """A validated chat request, with where it came from."""

    messages: tuple[dict[str, str], ...]
    sampling: Sampling
    adapter: AdapterChoice
    user_id: str = ""
    app_id: str = "default"

    def __post_init__(self) -> None:
        if not self.messages:
            raise InvalidRequest("messages must not be empty")
        for i, m in enumerate(self.messages):
            if m["role"] not in ROLES:
                raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m['role']!r}")
            if not m["content"].strip():
                raise InvalidRequest(f"messages[{i}].content must not be empty")

    @classmethod
    def from_pb(cls, msg: pb.GenerateRequest, app_id: str) -> GenerationRequest:
        return cls(
            messages=tuple({"role": m.role, "content": m.content} for m in msg.messages),
            sampling=Sampling.from_pb(msg.sampling),
            adapter=AdapterChoice.from_pb(msg.adapter),
            user_id=msg.user_id,
            app_id=app_id or "default",
        )


@dataclass
class Completion:
    """A finished (or aborted) answer and everything logged about it."""

    response_id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter_version: int
    ttft_seconds: float | None = None
    latency_seconds: float = 0.0

    def to_pb(self) -> pb.GenerateResponse:
        return pb.GenerateResponse(
            response_id=self.response_id, text=self.text, finish_reason=self.finish_reason,
            usage=pb.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens),
            adapter_version=self.adapter_version,
        )


@dataclass(frozen=True)
class FeedbackInput:
    """A validated rating."""

    response_id: str
    rating: str
    comment: str = ""
    correction: str = ""
    user_id: str = ""

    @classmethod
    def from_pb(cls, msg: pb.FeedbackRequest) -> FeedbackInput:
        if not msg.response_id:
            raise InvalidRequest("response_id must not be empty")
        if msg.rating not in _RATINGS:
            raise InvalidRequest("rating must be RATING_UP or RATING_DOWN")
        return cls(msg.response_id, _RATINGS[msg.rating], msg.comment, msg.correction, msg.user_id)


@dataclass
class AdapterRecord:
    """A registry row: one immutable adapter version."""

    version: int
    path: str
    base_model: str
    parent_version: int = 0
    status: str = "registered"
    created_at: str = ""
    promoted_at: str = ""
    metadata: dict = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: dict) -> AdapterRecord:
        row = dict(row)
        row["metadata"] = json.loads(row.pop("metadata_json") or "{}")
        row["promoted_at"] = row["promoted_at"] or ""
        return cls(**row)

    def to_row(self) -> dict:
        row = asdict(self)
        row["metadata_json"] = json.dumps(row.pop("metadata"), sort_keys=True)
        return row

    def to_pb(self) -> pb.Adapter:
        return pb.Adapter(
            version=self.version, path=self.path, base_model=self.base_model,
            parent_version=self.parent_version, status=self.status, created_at=self.created_at,
            promoted_at=self.promoted_at, metadata_json=json.dumps(self.metadata, sort_keys=True),
        )
