"""Named errors, each carrying the gRPC status it maps to; raised, never returned, never matched by text."""

from __future__ import annotations

import grpc


class InstructdError(Exception):
    """Base class; `code` is the gRPC status the client sees, the message its details."""

    code = grpc.StatusCode.INTERNAL


class InvalidRequest(InstructdError):
    """The request itself is malformed or out of range (fix the request, then retry)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(InstructdError):
    """A named thing (response id, adapter version, folder) does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(InstructdError):
    """The key's role may not do this, or the request names something the server is configured not to touch."""

    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(InstructdError):
    """The thing exists but is not in a state that allows this (e.g. a rejected adapter)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Conflict(InstructdError):
    """A compare-and-swap lost a race; re-read and retry."""

    code = grpc.StatusCode.ABORTED


class Unavailable(InstructdError):
    """The server is shutting down or the engine is not running; retry elsewhere or later."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(InstructdError):
    """No key, or a malformed, unknown or revoked one."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(InstructdError):
    """Too much at once (the engine's queue, or the key's rate): retry after `retry_after` seconds."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Relayed(InstructdError):
    """Another replica's answer to a call forwarded to it, passed on with its own status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


def preview(text: str, limit: int = 24) -> str:
    """A short, quoted prefix of caller input for an error message: never the whole of it."""
    return repr(text[:limit] + "…" if len(text) > limit else text)
