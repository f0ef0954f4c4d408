"""How a client reaches a server: its address, the key it sends, TLS, and gRPC's own retry policy."""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from instructd.server.config import ADMIN_KEY_FILE, ENV_API_KEY, ENV_TARGET, ENV_TLS_CA, default_home
from instructd.v1.metadata import AUTHORIZATION, BEARER

DEFAULT_TARGET = "localhost:50051"

# RESOURCE_EXHAUSTED (busy, rate limit) and UNAVAILABLE (not reachable, stopping) are worth another try, after
# the pushback the server names or an exponential backoff. Generation and ratings only: both are safe to repeat
# (a repeated rating replaces itself), while an admin action repeated after a lost answer might not be.
_RETRY = {"maxAttempts": 5, "initialBackoff": "0.25s", "maxBackoff": "8s", "backoffMultiplier": 2,
          "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]}
SERVICE_CONFIG = json.dumps({"methodConfig": [
    {"name": [{"service": "instructd.v1.Inference"}, {"service": "instructd.v1.Feedback"}], "retryPolicy": _RETRY}]})


@dataclass(frozen=True)
class Tls:
    """PEM files: the CA that signed the server's certificate, and (mutual TLS) the client's own."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        read = lambda p: Path(p).expanduser().read_bytes() if p else None  # noqa: E731
        return grpc.ssl_channel_credentials(root_certificates=read(self.ca), private_key=read(self.key),
                                            certificate_chain=read(self.cert))


def target_of(target: str | None) -> str:
    return target or os.environ.get(ENV_TARGET) or DEFAULT_TARGET


def is_loopback(target: str) -> bool:
    host = target.removeprefix("ipv4:").removeprefix("ipv6:").rsplit(":", 1)[0].strip("[]")
    if target.startswith("unix:") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key(target: str, explicit: str | None) -> str | None:
    """The key to send: the one given, else $INSTRUCTD_API_KEY, else the local admin key for this machine."""
    if explicit or os.environ.get(ENV_API_KEY):
        return explicit or os.environ[ENV_API_KEY]
    if is_loopback(target):
        try:
            return (default_home() / ADMIN_KEY_FILE).read_text().strip() or None
        except OSError:
            return None
    return None


def channel(target: str | None, key: str | None, tls: Tls | None, aio: bool):
    """An open channel and the metadata every call sends on it."""
    target = target_of(target)
    if tls is None and os.environ.get(ENV_TLS_CA):
        tls = Tls(ca=Path(os.environ[ENV_TLS_CA]))
    options = [("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1)]
    grpc_ = grpc.aio if aio else grpc
    made = (grpc_.secure_channel(target, tls.credentials(), options) if tls
            else grpc_.insecure_channel(target, options))
    key = api_key(target, key)
    return made, ((AUTHORIZATION, BEARER + key),) if key else ()
