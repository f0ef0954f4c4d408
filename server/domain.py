"""Domain types of the service, built from protobuf (validating as they go) and turned back with to_pb()."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass

from instructd.v1 import instructd_pb2 as pb

from .config import ServerConfig
from .errors import InvalidRequest, preview

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4
MAX_RESPONSE_ID_CHARS = 64
BASE_VERSION = 0  # adapter version 0 stands for the base model
_RATINGS = {pb.RATING_UP: "up", pb.RATING_DOWN: "down"}


class Audit(enum.Enum):
    """Admin and tuner actions recorded in the audit log (stored by name, lowercase)."""

    KEY_CREATED = pb.AUDIT_KEY_CREATED
    KEY_REVOKED = pb.AUDIT_KEY_REVOKED
    ADAPTER_REGISTERED = pb.AUDIT_ADAPTER_REGISTERED
    PROMOTED = pb.AUDIT_PROMOTED
    ROLLED_BACK = pb.AUDIT_ROLLED_BACK
    EVALUATION_RECORDED = pb.AUDIT_EVALUATION_RECORDED
    TUNING_TRIGGERED = pb.AUDIT_TUNING_TRIGGERED
    USER_FORGOTTEN = pb.AUDIT_USER_FORGOTTEN
    CANARY_STARTED = pb.AUDIT_CANARY_STARTED
    CANARY_ENDED = pb.AUDIT_CANARY_ENDED


@dataclass(frozen=True)
class Limits:
    """Size bounds on what callers send (defaults and meaning in ServerConfig)."""

    max_messages: int = 64
    max_stop_chars: int = 64
    max_user_id_bytes: int = 128
    max_comment_chars: int = 2000
    max_correction_chars: int = 8000

    @classmethod
    def from_config(cls, config: ServerConfig) -> Limits:
        return cls(config.max_messages, config.max_stop_chars, config.max_user_id_bytes, config.max_comment_chars,
                   config.max_correction_chars)

    def check_user_id(self, user_id: str, field: str) -> str:
        if len(user_id.encode()) > self.max_user_id_bytes:
            raise InvalidRequest(f"{field} is longer than {self.max_user_id_bytes} bytes: {preview(user_id)}")
        return user_id

    def check_length(self, text: str, limit: int, field: str) -> str:
        if len(text) > limit:
            raise InvalidRequest(f"{field} is {len(text)} characters, more than the {limit} allowed")
        return text


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
    def from_pb(cls, msg: pb.SamplingOptions, limits: Limits) -> Sampling:
        given = {f.name: v for f, v in msg.ListFields()}
        if "stop" in given:
            given["stop"] = tuple(limits.check_length(s, limits.max_stop_chars, "a stop string") for s in given["stop"])
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
    """A validated chat request, with where it came from (the application and key that sent it)."""

    messages: tuple[dict[str, str], ...]
    sampling: Sampling
    adapter: AdapterChoice
    user_id: str = ""
    app_id: str = "default"
    key_id: str = ""

    def __post_init__(self) -> None:
        if not self.messages:
            raise InvalidRequest("messages must not be empty")
        for i, m in enumerate(self.messages):
            if m["role"] not in ROLES:
                raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, "
                                     f"got {preview(m['role'])}")
            if not m["content"].strip():
                raise InvalidRequest(f"messages[{i}].content must not be empty")

    @property
    def characters(self) -> int:
        return sum(len(m["content"]) for m in self.messages)

    @classmethod
    def from_pb(cls, msg: pb.GenerateRequest, limits: Limits, app_id: str, key_id: str) -> GenerationRequest:
        if len(msg.messages) > limits.max_messages:
            raise InvalidRequest(f"{len(msg.messages)} messages: at most {limits.max_messages} are allowed")
        return cls(
            messages=tuple({"role": m.role, "content": m.content} for m in msg.messages),
            sampling=Sampling.from_pb(msg.sampling, limits),
            adapter=AdapterChoice.from_pb(msg.adapter),
            user_id=limits.check_user_id(msg.user_id, "user_id"),
            app_id=app_id,
            key_id=key_id,
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
    """A validated rating, with the application and key that sent it (it may rate only that application's
    answers)."""

    response_id: str
    rating: str
    comment: str = ""
    correction: str = ""
    user_id: str = ""
    app_id: str = "default"
    key_id: str = ""

    @classmethod
    def from_pb(cls, msg: pb.FeedbackRequest, limits: Limits, app_id: str, key_id: str) -> FeedbackInput:
        if not msg.response_id:
            raise InvalidRequest("response_id must not be empty")
        if len(msg.response_id) > MAX_RESPONSE_ID_CHARS:
            raise InvalidRequest(f"response_id is longer than {MAX_RESPONSE_ID_CHARS} characters: "
                                 f"{preview(msg.response_id)}")
        if msg.rating not in _RATINGS:
            raise InvalidRequest("rating must be RATING_UP or RATING_DOWN")
        return cls(msg.response_id, _RATINGS[msg.rating],
                   limits.check_length(msg.comment, limits.max_comment_chars, "comment"),
                   limits.check_length(msg.correction, limits.max_correction_chars, "correction"),
                   limits.check_user_id(msg.user_id, "user_id"), app_id, key_id)


def json_object(text: str, field: str) -> dict:
    """A JSON object sent in a string field (free-form lineage metadata)."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{field} is not valid JSON: {preview(str(exc), 80)}") from exc
    if not isinstance(value, dict):
        raise InvalidRequest(f"{field} must be a JSON object")
    return value


def is_held_out(exchange_id: str, share: float) -> bool:
    """Whether an exchange is held out for the gate, by a hash of its id: the same answer on every replica and in
    every run, so a held-out exchange is never trained on."""
    digest = int(hashlib.sha256(exchange_id.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < share
