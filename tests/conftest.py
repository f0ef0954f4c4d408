"""Shared fixtures: one real instructd server (vLLM on the embedded model) for the whole session,
a real SQLite file, real gRPC on free ports and a real /metrics endpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import sqlite_utils
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from instructd.client import Client
from instructd.server.config import default_cache
from instructd.server.model import default_model

START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`instructd serve` in a subprocess, as an operator would run it."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir, self.log_path = data_dir, log_path
        self.adapter_dir = data_dir / "incoming"
        self.port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "instructd.client.cli", "serve", "--port", str(self.port),
               "--metrics-port", str(self.metrics_port), "--data-dir", str(self.data_dir), "--max-model-len", "1024",
               "--no-tuner"]
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        self._wait_serving()

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with grpc.insecure_channel(self.target) as channel:
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
        raise TimeoutError(f"server not serving after {START_TIMEOUT_S}s; log: {self.log_path}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)

    def restart(self) -> None:
        assert self.stop() == 0
        self.start()

    def db(self) -> sqlite_utils.Database:
        """A separate connection to the server's SQLite file (WAL lets us read while it writes)."""
        return sqlite_utils.Database(self.data_dir / "instructd.db")

    def exchange(self, response_id: str) -> dict:
        """The logged exchange; it is committed right after the answer, so allow the writer a moment."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = list(self.db()["exchanges"].rows_where("id = ?", [response_id]))
            if rows:
                return rows[0]
            time.sleep(0.05)
        raise AssertionError(f"exchange {response_id} was not logged")

    def metrics(self) -> dict[str, float]:
        """Scrapes /metrics; returns {'name{label="v",...}': value} for every sample."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return default_model(default_cache())


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_dir) -> ServerProcess:
    root = tmp_path_factory.mktemp("instructd")
    proc = ServerProcess(root / "data", root / "server.log")
    proc.start()
    yield proc
    if proc.proc.poll() is None:
        assert proc.stop() == 0, f"unclean shutdown; log: {proc.log_path}"


@pytest.fixture(scope="session")
def client(server) -> Client:
    with Client(server.target, app_id="tests") as c:
        yield c
