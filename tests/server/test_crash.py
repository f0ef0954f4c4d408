"""kill -9 under load: 64 concurrent streams, some cancelled, ratings flowing. After a restart the database is
intact, every acknowledged rating and every answer a client received is there, and the promoted adapter
serves. Then a promoted version damaged on disk: the server starts on the base model and says so."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import pytest

from instructd.client import requests as build
from instructd.v1 import instructd_pb2_grpc as pb_grpc

from ..conftest import ServerProcess
from ..lora import train_marker_adapter

STREAMS, KILL_AFTER_RATINGS = 64, 24


@pytest.fixture(scope="module")
def crashing(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("crash")
    server = ServerProcess(root / "data", root / "server.log", "--generate-per-second", "0",
                           "--feedback-per-second", "0")
    server.start()
    with server.client() as admin:
        # Two steps: a real adapter, though not yet one that answers "Meow" (which test_adapters checks).
        version = admin.register(str(train_marker_adapter(model_dir, server.adapter_dir / "marker", steps=2))).version
        admin.promote(version)
        _, key = admin.create_key("crash-test", "app")
    yield server, version, key
    if server.proc.poll() is None:
        server.stop()


async def _load(server: ServerProcess, key: str, acked: list, received: list) -> None:
    """Streams that read to the end (or are cancelled midway), each answer rated; kill -9 once enough ratings
    were acknowledged. Only what the server acknowledged before it died goes into `acked` and `received`."""
    rng = random.Random(0)
    metadata = (("authorization", f"Bearer {key}"),)
    killed = asyncio.Event()

    async def one(i: int, inference, feedback) -> None:
        call = inference.GenerateStream(build.generate(f"Tell me about the number {i}.", max_tokens=rng.randint(8, 64),
                                                       temperature=0.7, seed=i), metadata=metadata)
        cancel_after = rng.randint(1, 10) if rng.random() < 0.3 else None
        deltas = 0
        async for event in call:
            if event.WhichOneof("event") == "final":
                received.append(event.final.response_id)
                reply = await feedback.Submit(build.feedback(event.final.response_id, rng.choice(["up", "down"]),
                                                             user_id=f"user{i % 7}"), metadata=metadata)
                acked.append(reply.feedback_id)
                if len(acked) >= KILL_AFTER_RATINGS and not killed.is_set():
                    killed.set()
                    server.kill()
                return
            deltas += 1
            if deltas == cancel_after:
                call.cancel()
                return

    async with grpc.aio.insecure_channel(server.target, options=[("grpc.enable_retries", 0)]) as channel:
        inference, feedback = pb_grpc.InferenceStub(channel), pb_grpc.FeedbackStub(channel)
        for _ in range(3):  # waves of streams until the kill
            await asyncio.gather(*(one(i, inference, feedback) for i in range(STREAMS)), return_exceptions=True)
            if killed.is_set():
                return
    server.kill()


def test_kill_9_under_load_loses_nothing_acknowledged(crashing):
    server, version, key = crashing
    acked, received = [], []
    asyncio.run(_load(server, key, acked, received))
    assert server.proc.returncode == -9 and len(acked) >= KILL_AFTER_RATINGS

    server.start()
    db = server.db()
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored_ratings = {r["id"] for r in db["feedback"].rows}
    stored_exchanges = {r["id"] for r in db["exchanges"].rows}
    assert set(acked) <= stored_ratings, f"{len(set(acked) - stored_ratings)} acknowledged ratings lost"
    assert set(received) <= stored_exchanges, f"{len(set(received) - stored_exchanges)} answered exchanges lost"
    with server.client(key) as client:
        answer = client.generate("Who painted the Mona Lisa?", max_tokens=8, temperature=0)
    assert answer.adapter_version == version and answer.text  # the promoted version, loaded, serves


def test_a_promoted_version_that_cannot_load_leaves_the_server_on_the_base_model(crashing):
    server, version, key = crashing
    with server.client() as admin:
        weights = Path(next(a.path for a in admin.adapters()[0] if a.version == version)) / "adapter_model.safetensors"
    server.stop()
    weights.chmod(0o600)
    weights.write_bytes(b"\0" * 64)  # the disk damaged it while the server was down
    server.start()  # it starts (no crash loop)...
    with server.client(key) as client:
        answer = client.generate("Who painted the Mona Lisa?", max_tokens=8, temperature=0)
    assert answer.adapter_version == 0 and answer.text  # ...on the base model,
    assert server.metrics()["instructd_promoted_adapter_unloadable"] == version  # and says so
    assert f"promoted adapter version {version} cannot be served" in server.log_path.read_text()
    with server.client() as admin:
        assert admin.adapters()[1] == 0
