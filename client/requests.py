"""Builds the protobuf requests for both clients, so the sync and asyncio ones cannot drift apart."""

from __future__ import annotations

import json
from collections.abc import Sequence

from instructd.v1 import instructd_pb2 as pb

Messages = str | Sequence[dict[str, str]]


def generate(messages: Messages, *, system: str | None = None, max_tokens: int | None = None,
             temperature: float | None = None, top_p: float | None = None, stop: Sequence[str] = (),
             seed: int | None = None, adapter: int | str | None = None, user_id: str = "") -> pb.GenerateRequest:
    """`messages` is a prompt string or chat turns; `adapter` is a version, "base", or None (the promoted one)."""
    turns = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
    if system is not None:
        turns.insert(0, {"role": "system", "content": system})
    sampling = pb.SamplingOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=list(stop),
                                  seed=seed)
    if adapter == "base":
        selector = pb.AdapterSelector(base=True)
    elif adapter is None:
        selector = pb.AdapterSelector()
    else:
        selector = pb.AdapterSelector(version=int(adapter))
    return pb.GenerateRequest(messages=[pb.ChatMessage(**t) for t in turns], sampling=sampling,
                              adapter=selector, user_id=user_id)


def feedback(response_id: str, rating: str, *, comment: str = "", correction: str = "",
             user_id: str = "") -> pb.FeedbackRequest:
    """`rating` is "up" or "down"."""
    ratings = {"up": pb.RATING_UP, "down": pb.RATING_DOWN}
    if rating not in ratings:
        raise ValueError(f"rating must be 'up' or 'down', got {rating!r}")
    return pb.FeedbackRequest(response_id=response_id, rating=ratings[rating], comment=comment,
                              correction=correction, user_id=user_id)


def register(path: str, *, parent_version: int = 0, metadata: dict | None = None,
             rejected: bool = False) -> pb.RegisterAdapterRequest:
    return pb.RegisterAdapterRequest(path=str(path), parent_version=parent_version,
                                     metadata_json=json.dumps(metadata or {}), rejected=rejected)


def promote(version: int, expected_current: int | None = None, canary: bool = False) -> pb.PromoteRequest:
    return pb.PromoteRequest(version=version, expected_current=expected_current, canary=canary)


def rollback(version: int | None = None, expected_current: int | None = None) -> pb.RollbackRequest:
    return pb.RollbackRequest(version=version, expected_current=expected_current)


def create_key(app_id: str, role: str, name: str = "", secret: str = "") -> pb.CreateKeyRequest:
    """`role` is "app", "tuner" or "admin"; `secret`: register that existing key instead of making one."""
    roles = {"app": pb.ROLE_APP, "tuner": pb.ROLE_TUNER, "admin": pb.ROLE_ADMIN}
    if role not in roles:
        raise ValueError(f"role must be 'app', 'tuner' or 'admin', got {role!r}")
    return pb.CreateKeyRequest(app_id=app_id, role=roles[role], name=name, secret=secret)

