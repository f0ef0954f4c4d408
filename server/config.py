"""Server configuration: one frozen dataclass, built once from the command line and the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Every environment variable instructd reads, declared once, here.
ENV_HOME = "INSTRUCTD_HOME"            # root of data and caches; default ~/.local/share/instructd
ENV_CACHE = "INSTRUCTD_CACHE"          # where the converted default model is cached; default ~/.cache/instructd
ENV_TARGET = "INSTRUCTD_TARGET"        # host:port the client and CLI talk to; default localhost:50051
ENV_KV_CACHE = "VLLM_CPU_KVCACHE_SPACE"  # vLLM on CPU: GiB reserved for the KV cache (default 92% of a NUMA node)


def default_home() -> Path:
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".local/share/instructd")


def default_cache() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache/instructd")


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
    """Interface the gRPC and metrics servers listen on."""
    port: int = 50051
    """gRPC port; 0 picks a free one."""
    metrics_port: int = 9090
    """Prometheus /metrics port; 0 picks a free one."""
    max_model_len: int = 2048
    """Context length served (prompt plus answer), in tokens."""
    default_max_tokens: int = 256
    """Answer length when a request does not set max_tokens."""
    max_loras: int = 4
    """Adapters the engine can hold at once (the promoted one is pinned)."""
    max_lora_rank: int = 64
    """Largest LoRA rank that can be registered."""
    kv_cache_gib: float = 2.0
    """CPU only: GiB of memory for vLLM's KV cache."""
    gpu_memory_utilization: float = 0.8
    """GPU only: share of GPU memory vLLM may take (the rest is left for a tuner)."""
    drain_seconds: float = 30.0
    """On SIGTERM, how long requests in flight may take to finish."""
    tuner: bool = False
    """Start the tuner in its own process beside the server (`instructd serve` does by default)."""

    def __post_init__(self) -> None:
        home = default_home()
        defaults = {"data_dir": home, "adapter_dir": home / "incoming", "cache_dir": default_cache()}
        for name, value in defaults.items():
            object.__setattr__(self, name, Path(getattr(self, name) or value).expanduser().resolve())
        if self.model is not None:
            object.__setattr__(self, "model", Path(self.model).expanduser().resolve())
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

    @property
    def db_path(self) -> Path:
        return self.data_dir / "instructd.db"

    @property
    def versions_dir(self) -> Path:
        """Immutable copies of registered adapters, one folder per version."""
        return self.data_dir / "adapters"
