"""Runs `instructd serve` (and, if wanted, `instructd tuner`) as child processes on free ports, as an
operator would: for tests, benchmarks and scripts that need a real server of their own."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instructd.server.config import ADMIN_KEY_FILE, ENV_API_KEY

from .channel import Tls
from .client import AsyncClient, Client

CLI = [sys.executable, "-m", "instructd.client.cli"]
_random = random.SystemRandom()
_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now, for a process started later to bind. Chosen below the kernel's ephemeral range, the ports
    that bind(0) and outgoing connections take, such as those vLLM's engine takes as it starts: one handed out from
    that range could be taken before its process binds it (a test server once failed with "Address already in
    use"). Never the same port twice in one process."""
    low, high = _below_ephemeral()
    for _ in range(1000):
        port = _random.randrange(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port from {low} to {high - 1}")


def _below_ephemeral() -> tuple[int, int]:
    """The ports free_port chooses from: the half below the ephemeral range (16384-32767 on Linux by default)."""
    try:  # Linux; elsewhere the range starts at 32768 or above (macOS, Windows: 49152)
        start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        start = 32768
    return max(1024, start // 2), max(start, 2048)


def tuner_command(targets: list[str], work_dir: Path, *args: str) -> list[str]:
    """`instructd tuner` for these servers, with a directory of its own (run it with a tuner key in its env)."""
    return [*CLI, "tuner", "--target", ",".join(targets), "--work-dir", str(work_dir), *args]


class LocalServer:
    """`instructd serve --no-tuner` on free ports with its own data directory; output goes to `log_path`."""

    def __init__(self, data_dir: Path, log_path: Path, *serve_args: str, start_timeout: float = 600,
                 tls: Tls | None = None, tuner: bool = False, env: dict[str, str] | None = None) -> None:
        """`tls`: how a client reaches it when serve_args make it serve TLS; `tuner`: serve starts its own tuner."""
        self.data_dir, self.log_path, self.serve_args, self.tls = Path(data_dir), Path(log_path), serve_args, tls
        self.with_tuner, self.process_env = tuner, env
        self.adapter_dir = self.data_dir / "incoming"
        self.port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [*CLI, "serve", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
               "--data-dir", str(self.data_dir), "--tuner" if self.with_tuner else "--no-tuner", *self.serve_args]
        # A session of its own: a hard kill of the server (tests do kill -9) takes vLLM's engine process too.
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "a"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env=self.process_env)
        self._wait_serving()

    @property
    def api_key(self) -> str:
        """The admin key the server made in its data directory on first start."""
        return (self.data_dir / ADMIN_KEY_FILE).read_text().strip()

    def client(self, api_key: str | None = None, **options) -> Client:
        return Client(self.target, api_key=api_key or self.api_key, **{"tls": self.tls, **options})

    def async_client(self, api_key: str | None = None, **options) -> AsyncClient:
        return AsyncClient(self.target, api_key=api_key or self.api_key, **{"tls": self.tls, **options})

    @property
    def tuner_dir(self) -> Path:
        """A tuner's own directory, beside the server's, sharing no file with it."""
        return self.data_dir.parent / "tuner"

    def tuner_command(self, *args: str) -> list[str]:
        """`instructd tuner` for this server, as if on another machine (run it with `env(tuner key)`)."""
        return tuner_command([self.target], self.tuner_dir, *args)

    def env(self, api_key: str | None = None) -> dict[str, str]:
        """The environment for a command (tuner, CLI) that talks to this server with a key."""
        return {**os.environ, ENV_API_KEY: api_key or self.api_key}

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        with (grpc.secure_channel(self.target, self.tls.credentials()) if self.tls
              else grpc.insecure_channel(self.target)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_path}\n"
                                       + self.log_path.read_text()[-3000:])
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2, wait_for_ready=True)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)  # polling another process's readiness: nothing to await across processes
        raise TimeoutError(f"server not serving after {self.start_timeout}s; log: {self.log_path}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)

    def kill(self) -> None:
        """kill -9, the server and every process it started (vLLM's engine), as a crash would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def restart(self) -> None:
        if self.stop() != 0:
            raise RuntimeError(f"unclean shutdown; log: {self.log_path}")
        self.start()

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *_) -> None:
        if self.proc and self.proc.poll() is None:
            self.stop()
