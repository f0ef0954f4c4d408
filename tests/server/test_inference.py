"""The generation use case's logic, fast, with a stand-in engine (the real one is in test_generation.py): an
exchange is logged exactly once however the request ends, is committed before the answer returns, and a
write that fails is counted and refused rather than lost in silence; the bound on requests in flight holds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import sqlite_utils
from prometheus_client import CollectorRegistry

from instructd.server.config import ServerConfig
from instructd.server.domain import AdapterChoice, GenerationRequest, Sampling
from instructd.server.engine import Chunk
from instructd.server.errors import ResourceExhausted, Unavailable
from instructd.server.inference import Inference
from instructd.server.metrics import Metrics
from instructd.server.peers import Peers
from instructd.server.router import AdapterRouter
from instructd.server.store import Store


class StandInEngine:
    max_model_len, base_name, base_config = 1024, "stand-in", {}

    def __init__(self) -> None:
        self.release, self.waiting = asyncio.Event(), asyncio.Event()
        self.closed = 0

    async def render(self, messages) -> list[int]:
        return [1, 2, 3]

    async def stream(self, prompt_ids, sampling, max_tokens, adapter, request_id):
        try:
            yield Chunk("Hello", 1, 3)
            self.waiting.set()
            await self.release.wait()
            yield Chunk(" world", 1, 3, "stop")
        finally:
            self.closed += 1


def _setup(tmp_path: Path, **config):
    engine, store = StandInEngine(), Store(tmp_path / "a.db")
    metrics = Metrics(CollectorRegistry())
    config = ServerConfig(data_dir=tmp_path, **config)
    router = AdapterRouter(config, engine, store, metrics)
    return engine, store, metrics, Inference(engine, router, store, metrics, config, Peers(config, "r1"))


REQUEST = GenerationRequest(({"role": "user", "content": "hi"},), Sampling(), AdapterChoice())


def test_a_cancelled_request_closes_the_engine_stream_and_is_logged_once(tmp_path):
    engine, store, metrics, inference = _setup(tmp_path)

    async def run():
        task = asyncio.create_task(inference.run(REQUEST, "r1"))
        await engine.waiting.wait()  # mid-answer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    store.close()
    rows = list(sqlite_utils.Database(tmp_path / "a.db")["exchanges"].rows)
    assert engine.closed == 1 and len(rows) == 1
    assert rows[0]["finish_reason"] == "abort" and rows[0]["response"] == "Hello"


def test_a_finished_answer_is_committed_before_it_returns(tmp_path):
    engine, store, metrics, inference = _setup(tmp_path)

    async def run():
        engine.release.set()
        done = await inference.run(REQUEST, "r2")
        return done, sqlite_utils.Database(tmp_path / "a.db")["exchanges"].get("r2")

    done, row = asyncio.run(run())
    store.close()
    assert done.text == row["response"] == "Hello world" and row["finish_reason"] == "stop"


def test_a_failed_write_is_counted_and_refused(tmp_path):
    engine, store, metrics, inference = _setup(tmp_path)
    engine.release.set()
    sqlite_utils.Database(tmp_path / "a.db").execute(  # every write of an exchange fails, as on a full disk
        "CREATE TRIGGER refuse BEFORE INSERT ON exchanges BEGIN SELECT RAISE(ABORT, 'disk full'); END")

    with pytest.raises(Unavailable):
        asyncio.run(inference.run(REQUEST, "r3"))
    store.close()
    assert metrics.log_write_failures._value.get() == 1


def test_one_request_more_than_the_bound_is_refused_at_once(tmp_path):
    engine, store, metrics, inference = _setup(tmp_path, max_in_flight=2)

    async def run():
        first = [asyncio.create_task(inference.run(REQUEST, f"r{i}")) for i in range(2)]
        await engine.waiting.wait()
        await asyncio.sleep(0)  # both are in
        with pytest.raises(ResourceExhausted) as refused:
            await inference.run(REQUEST, "r9")
        engine.release.set()
        await asyncio.gather(*first)
        await inference.run(REQUEST, "r10")  # room again
        return refused.value

    refused = asyncio.run(run())
    store.close()
    assert refused.retry_after > 0
