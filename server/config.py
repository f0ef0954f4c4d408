"""Server configuration: one frozen dataclass, built once from the command line and the environment."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .canary import CanaryMode

# Every environment variable instructd reads, declared once, here.
ENV_HOME = "INSTRUCTD_HOME"            # root of data and caches; default ~/.local/share/instructd
ENV_CACHE = "INSTRUCTD_CACHE"          # where the converted default model is cached; default ~/.cache/instructd
ENV_TARGET = "INSTRUCTD_TARGET"        # host:port the client and CLI talk to; default localhost:50051
ENV_API_KEY = "INSTRUCTD_API_KEY"      # the key the client and CLI send; default: the local admin key file
ENV_TLS_CA = "INSTRUCTD_TLS_CA"        # CA certificate the client trusts; set: the client speaks TLS
ENV_KV_CACHE = "VLLM_CPU_KVCACHE_SPACE"  # vLLM on CPU: GiB reserved for the KV cache (default 92% of a NUMA node)
ENV_RESERVED_CPUS = "VLLM_CPU_NUM_OF_RESERVED_CPU"  # vLLM on CPU: cores kept from its compute (engine.py)

# The /metrics port, declared here only. Not 9090: that is Prometheus' own port, and the two collide on any host (or
# compose stack) that runs both. Exporters take ports from Prometheus' "default port allocations" wiki page; its
# 9100-9999 range has been full since 2023 and the list goes on from 10000, where 10025 was the one gap (between
# 10024 and 10026) in the newest copy we could read. The Dockerfile, deploy/ and README use the same number, and
# tests/deploy checks that they do.
DEFAULT_METRICS_PORT = 10025


def default_home() -> Path:
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".local/share/instructd")


def default_cache() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache/instructd")


REPLICA_ID = re.compile(r"[a-z0-9-]{1,16}")
ADMIN_KEY_FILE = "admin.key"  # in the data directory: the admin key `serve` makes on first start (mode 0600)
TUNER_KEY_FILE = "tuner.key"  # in the data directory: the key of the tuner that `serve` starts


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to start; validated on construction."""

    model: Path | None = None
    """HF model folder to serve; None serves the embedded SmolLM2-135M-Instruct."""
    data_dir: Path = None  # type: ignore[assignment]
    """Holds the SQLite database and the immutable adapter versions."""
    adapter_dir: Path = None  # type: ignore[assignment]
    """Adapters may be registered only from folders inside this directory."""
    cache_dir: Path = None  # type: ignore[assignment]
    """Where the embedded model is converted to safetensors, once."""
    host: str = "127.0.0.1"
    """Interface gRPC listens on. Anything but loopback without TLS is logged as a warning."""
    port: int = 50051
    """gRPC port; 0 picks a free one."""
    metrics_host: str = "127.0.0.1"
    """Interface /metrics listens on: loopback by default, since it needs no key."""
    metrics_port: int = DEFAULT_METRICS_PORT
    """Prometheus /metrics port; 0 picks a free one."""
    tls_cert: Path | None = None
    """PEM certificate chain of the server; with tls_key, gRPC is served over TLS."""
    tls_key: Path | None = None
    """PEM private key of tls_cert."""
    tls_client_ca: Path | None = None
    """PEM CA certificate(s): when set, clients must present a certificate it signed (mutual TLS)."""
    replica_id: str = ""
    """This replica's name inside every response id it makes ("<replica id>.<hex>"); empty: one made up at first
    start and kept in the database. Ratings for another replica's answers are forwarded to it (see peers)."""
    peers: tuple[tuple[str, str], ...] = ()
    """The other replicas, as (replica id, host:port): where a rating for their answers is forwarded."""
    peer_tls_ca: Path | None = None
    """PEM CA certificate of the peers' TLS; None: peers are reached without TLS."""
    tensor_parallel_size: int = 1
    """vLLM's own parallelism, passed through: GPUs per model replica (tensor parallel)..."""
    pipeline_parallel_size: int = 1
    """...pipeline stages..."""
    data_parallel_size: int = 1
    """...and engine copies inside this one server (data parallel)."""
    auth: bool = True
    """Require an API key on every call but health. Off only for benchmarks that measure its cost."""
    max_model_len: int = 2048
    """Context length served (prompt plus answer), in tokens."""
    default_max_tokens: int = 256
    """Answer length when a request does not set max_tokens."""
    max_loras: int = 4
    """Adapters the engine can hold at once (the promoted one is pinned)."""
    max_lora_rank: int = 64
    """Largest LoRA rank that can be registered."""
    max_adapter_bytes: int = 2 << 30
    """Largest adapter weights file that can be registered (rank 64 on every module of a 70B model fits)."""
    kv_cache_gib: float = 2.0
    """CPU only: GiB of memory for vLLM's KV cache."""
    gpu_memory_utilization: float = 0.8
    """GPU only: share of GPU memory vLLM may take (the rest is left for a tuner)."""
    drain_seconds: float = 30.0
    """On SIGTERM, how long requests in flight may take to finish."""
    max_in_flight: int = 256
    """Generation requests admitted at once (running in the engine or waiting for it); beyond it a request is
    refused at once with RESOURCE_EXHAUSTED rather than joining an ever longer queue."""
    generate_per_second: float = 50.0
    """Generation requests per second per application key (a burst of twice that is allowed); 0: no limit.
    Tuner and admin keys are not limited: they are the operator's own."""
    feedback_per_second: float = 200.0
    """Ratings per second per application key (a burst of twice that is allowed); 0: no limit."""
    max_request_bytes: int = 1 << 20
    """Largest request message gRPC accepts (bigger: RESOURCE_EXHAUSTED from gRPC itself, before any parsing)."""
    max_messages: int = 64
    """Chat turns per request."""
    max_stop_chars: int = 64
    """Length of each stop string."""
    max_user_id_bytes: int = 128
    """Size of a user id (in a request or a rating)."""
    max_comment_chars: int = 2000
    """Length of a rating's comment."""
    max_correction_chars: int = 8000
    """Length of a rating's correction, which becomes a training target."""
    durable_answers: bool = True
    """Commit each exchange before its answer is sent, so a response id a client holds can always be rated.
    Off only for the benchmark that measures what this costs."""
    held_out_share: float = 0.2
    """Share of rated exchanges held out from training for the tuner's gate, chosen by a hash of their id: the
    same on every replica and in every export."""
    retention_days: float = 0.0
    """Delete exchanges (and their ratings) older than this that no adapter was trained on; 0 keeps them all."""
    canary: CanaryMode = CanaryMode.AUTO
    """What happens to a candidate the tuner releases (Promote with canary): AUTO serves it to `canary_share` of users
    and lets their ratings promote or roll it back; MANUAL rolls back on its own but promotes only when an operator
    does (`instructd promote`); OFF promotes it at once. An operator's `instructd promote VERSION` takes effect at
    once unless it asks for a canary."""
    canary_share: float = 0.1
    """Share of users (by a hash of their user id) a canary serves."""
    canary_max_users: int = 1000
    """Most distinct users a canary serves: later users in its share get the incumbent."""
    canary_max_ratings: int = 400
    """A canary whose answers got this many ratings without a clear call ends: the incumbent stays (or the candidate
    is promoted, with canary_promote_at_limit). One found no worse in manual mode waits for the operator instead."""
    canary_max_seconds: float = 86400.0
    """Likewise, a canary that has run this long ends."""
    canary_promote_at_limit: bool = False
    """At a limit without a clear call, promote the candidate instead of keeping the incumbent."""
    tuner: bool = False
    """Start the tuner in its own process beside the server (`instructd serve` does by default)."""

    def __post_init__(self) -> None:
        home = default_home()
        defaults = {"data_dir": home, "adapter_dir": home / "incoming", "cache_dir": default_cache()}
        for name, value in defaults.items():
            object.__setattr__(self, name, Path(getattr(self, name) or value).expanduser().resolve())
        for name in ("model", "tls_cert", "tls_key", "tls_client_ca", "peer_tls_ca"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)).expanduser().resolve())
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {getattr(self, name)}")
        if self.max_model_len < 16:
            raise ValueError("max_model_len must be at least 16")
        if not 1 <= self.default_max_tokens < self.max_model_len:
            raise ValueError("default_max_tokens must be in 1..max_model_len-1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_gib <= 0:
            raise ValueError("kv_cache_gib must be positive")
        limits = ("max_in_flight", "max_adapter_bytes", "max_request_bytes", "max_messages", "max_stop_chars", "max_user_id_bytes",
                  "max_comment_chars", "max_correction_chars")
        for name in limits:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.replica_id and not REPLICA_ID.fullmatch(self.replica_id):
            raise ValueError(f"replica_id must be 1-16 lowercase letters, digits or '-', got {self.replica_id!r}")
        for peer, target in self.peers:
            if not REPLICA_ID.fullmatch(peer) or not target or peer == self.replica_id:
                raise ValueError(f"a peer is ID=HOST:PORT with another replica's id, got {peer}={target}")
        if min(self.tensor_parallel_size, self.pipeline_parallel_size, self.data_parallel_size) < 1:
            raise ValueError("parallel sizes must be at least 1")
        if not 0 <= self.held_out_share < 1:
            raise ValueError(f"held_out_share must be in [0, 1), got {self.held_out_share}")
        if not 0 < self.canary_share < 1:
            raise ValueError(f"canary_share must be in (0, 1), got {self.canary_share}")
        if min(self.canary_max_users, self.canary_max_ratings, self.canary_max_seconds) <= 0:
            raise ValueError("canary_max_users, canary_max_ratings and canary_max_seconds must be positive")
        for name in ("generate_per_second", "feedback_per_second", "retention_days"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative (0: no limit), got {getattr(self, name)}")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "instructd.db"

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def versions_dir(self) -> Path:
        """Immutable copies of registered adapters, one folder per version."""
        return self.data_dir / "adapters"
