"""Shared fixtures: one real instructd server (vLLM on the embedded model) for the whole session,
a real SQLite file, real gRPC on free ports and a real /metrics endpoint."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import sqlite_utils
from prometheus_client.parser import text_string_to_metric_families

from instructd.client import Client
from instructd.client.local import LocalServer
from instructd.server.config import default_cache
from instructd.server.model import default_model


class ServerProcess(LocalServer):
    """A local server on a short context, with helpers to look into its store and scrape its metrics."""

    def __init__(self, data_dir: Path, log_path: Path, *serve_args: str, **options) -> None:
        super().__init__(data_dir, log_path, "--max-model-len", "1024", *serve_args, **options)

    def db(self) -> sqlite_utils.Database:
        """A separate connection to the server's SQLite file (WAL lets us read while it writes)."""
        return sqlite_utils.Database(self.data_dir / "instructd.db")

    def exchange(self, response_id: str) -> dict:
        """The logged exchange: committed before its answer was sent, so it is there, no waiting."""
        rows = list(self.db()["exchanges"].rows_where("id = ?", [response_id]))
        assert rows, f"exchange {response_id} was not committed before its answer"
        return rows[0]

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
def app_key(server) -> str:
    """An application key (application "tests"), as an application would have."""
    with server.client() as admin:
        return admin.create_key("tests", "app", "the test suite")[1]


@pytest.fixture(scope="session")
def client(server, app_key) -> Client:
    with server.client(app_key) as c:
        yield c


@pytest.fixture(scope="session")
def admin(server) -> Client:
    """The admin key's client (the key serve made on first start)."""
    with server.client() as c:
        yield c
