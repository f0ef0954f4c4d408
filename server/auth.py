"""Who may do what: API keys, their roles, and which role may call which method.

A key is "ik_<id>_<secret>": the id finds the key, the secret (256 random bits) proves it. Only a SHA-256 of
the secret is stored (a slow password hash buys nothing for 256 random bits), compared in constant time.
Valid keys are held in memory, so checking one costs a dict lookup and a hash; the store is their record.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from instructd.v1 import instructd_pb2 as pb
from instructd.v1.metadata import BEARER

from .errors import InvalidRequest, PermissionDenied, Unauthenticated, preview

log = logging.getLogger(__name__)

KEY_PREFIX = "ik_"
_KEY = re.compile(r"ik_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
APP_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
LAST_USED_EVERY = 60.0  # seconds: how often a key's last-used time is written, at most


class Role(enum.Enum):
    APP = pb.ROLE_APP
    TUNER = pb.ROLE_TUNER
    ADMIN = pb.ROLE_ADMIN

    @classmethod
    def parse(cls, name: str) -> Role:
        return cls[name.upper()]


@dataclass(frozen=True)
class Principal:
    """The caller of one request, as its key says."""

    key_id: str
    app_id: str
    role: Role


@dataclass
class KeyRecord:
    """A stored key: never its secret, only a digest of it."""

    id: str
    app_id: str
    role: Role
    name: str
    digest: str
    created_at: str
    last_used_at: str = ""
    revoked_at: str = ""

    @property
    def principal(self) -> Principal:
        return Principal(self.id, self.app_id, self.role)

    def to_pb(self) -> pb.ApiKey:
        return pb.ApiKey(id=self.id, app_id=self.app_id, role=self.role.value, name=self.name,
                         created_at=self.created_at, last_used_at=self.last_used_at, revoked_at=self.revoked_at)


def new_key(app_id: str, role: Role, name: str, now: str, existing: str = "") -> tuple[KeyRecord, str]:
    """A fresh key (or, `existing` given, that key, made on another replica): its record and the whole key."""
    if not APP_ID.fullmatch(app_id):
        raise InvalidRequest(f"app_id must be 1-64 letters, digits, '.', '_' or '-', got {preview(app_id)}")
    if len(name) > 128:
        raise InvalidRequest("a key's name is at most 128 characters")
    if existing:
        match = _KEY.fullmatch(existing)
        if match is None:
            raise InvalidRequest("secret must be a whole key, 'ik_<id>_<secret>'")
        key_id, secret = match.groups()
    else:
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    return KeyRecord(key_id, app_id, role, name, _digest(secret), now), f"{KEY_PREFIX}{key_id}_{secret}"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Keyring:
    """The valid keys, in memory; `authenticate` is the check every call passes."""

    def __init__(self, records: list[KeyRecord], touch) -> None:
        self._keys = {r.id: r for r in records if not r.revoked_at}
        self._touch = touch              # touch(key_id): records "used now" in the store, without waiting
        self._touched: dict[str, float] = {}

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated("this call needs an API key: send 'authorization: Bearer <key>' metadata")
        match = _KEY.fullmatch(authorization.removeprefix(BEARER).strip())
        if not authorization.startswith(BEARER) or match is None:
            raise Unauthenticated("malformed API key: expected 'authorization: Bearer ik_<id>_<secret>'")
        key_id, secret = match.groups()
        record = self._keys.get(key_id)
        # Unknown, revoked and wrong keys get one answer, and the digest is compared in constant time.
        if record is None or not hmac.compare_digest(record.digest, _digest(secret)):
            raise Unauthenticated("unknown or revoked API key")
        now = time.monotonic()
        if now - self._touched.get(key_id, -LAST_USED_EVERY) >= LAST_USED_EVERY:
            self._touched[key_id] = now
            self._touch(key_id)
        return record.principal

    def find(self, secret: str) -> Principal | None:
        """The principal of a whole key, or None if it is not valid."""
        try:
            return self.authenticate(BEARER + secret)
        except Unauthenticated:
            return None

    def add(self, record: KeyRecord) -> None:
        self._keys[record.id] = record

    def remove(self, key_id: str) -> None:
        self._keys.pop(key_id, None)

    def has_admin(self) -> bool:
        return any(r.role is Role.ADMIN for r in self._keys.values())


def write_key_file(path: Path, secret: str) -> None:
    """Writes a key where only its owner can read it (created 0600, never readable by others in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.replace(tmp, path)


def read_key_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------- who may call what

_APP, _TUNER = frozenset({Role.APP}), frozenset({Role.TUNER})
# The roles that may call each method of ours, besides ROLE_ADMIN, which may call every one.
POLICY: dict[str, frozenset[Role]] = {
    "/instructd.v1.Inference/Generate": _APP | _TUNER,      # the tuner's gate answers its suite through the server
    "/instructd.v1.Inference/GenerateStream": _APP | _TUNER,
    "/instructd.v1.Feedback/Submit": _APP,
    "/instructd.v1.Admin/GetStats": _APP,                   # an application key sees its own application only
    "/instructd.v1.Admin/ListAdapters": _TUNER,
    "/instructd.v1.Admin/RegisterAdapter": _TUNER,
    "/instructd.v1.Admin/RecordEvaluation": _TUNER,
    "/instructd.v1.Admin/Promote": _TUNER,                  # with expected_current only, see authorize()
    "/instructd.v1.Admin/GetTuningStatus": _TUNER,
    "/instructd.v1.Admin/Rollback": frozenset(),
    "/instructd.v1.Admin/TriggerTuning": frozenset(),
    "/instructd.v1.Access/CreateKey": frozenset(),
    "/instructd.v1.Access/ListKeys": frozenset(),
    "/instructd.v1.Access/RevokeKey": frozenset(),
    "/instructd.v1.Access/ListAudit": frozenset(),
    "/instructd.v1.Access/Forget": frozenset(),
    "/instructd.v1.Tuning/ExportFeedback": _TUNER,
    "/instructd.v1.Tuning/UploadAdapter": _TUNER,
    "/instructd.v1.Tuning/DownloadAdapter": _TUNER,
    "/instructd.v1.Tuning/StartRun": _TUNER,
    "/instructd.v1.Tuning/UpdateRun": _TUNER,
    "/instructd.v1.Tuning/ClaimRequest": _TUNER,
    "/instructd.v1.Tuning/RecoverRuns": _TUNER,
}
OPEN_SERVICES = ("/grpc.health.v1.Health/",)  # load balancers and supervisors probe health with no key
ANY_KEY_SERVICES = ("/grpc.reflection.",)     # the schema (public anyway, it is in the repository) for any key
_PROMOTE = "/instructd.v1.Admin/Promote"


def authorize(principal: Principal, method: str, request) -> None:
    """Raises PermissionDenied unless the key's role may make this call."""
    if principal.role is Role.ADMIN or method.startswith(ANY_KEY_SERVICES):
        return
    if principal.role not in POLICY.get(method, frozenset()):
        raise PermissionDenied(f"a {principal.role.name.lower()} key may not call {method.rsplit('/', 1)[-1]}")
    if method == _PROMOTE and not request.HasField("expected_current"):
        raise PermissionDenied("a tuner key promotes only with expected_current (compare-and-swap)")
