"""The store on a real SQLite file: migrations, durability, feedback replacement, rollback targets."""

from __future__ import annotations

import asyncio

import pytest
import sqlite_utils

from instructd.server.domain import AdapterChoice, AdapterRecord, Completion, FeedbackInput, GenerationRequest, Sampling
from instructd.server.errors import NotFound
from instructd.server.store import MIGRATIONS, Store


def _exchange(store: Store, response_id: str, version: int = 0):
    request = GenerationRequest(({"role": "user", "content": "hi"},), Sampling(), AdapterChoice())
    return store.log_exchange(request, Completion(response_id, "hello", "stop", 3, 1, version))


def test_schema_is_migrated_once_and_uses_wal(tmp_path):
    store = Store(tmp_path / "a.db")
    store.close()
    Store(tmp_path / "a.db").close()  # opening again must not re-run migrations
    db = sqlite_utils.Database(tmp_path / "a.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {"exchanges", "feedback", "adapters", "promotions", "tuning_runs"} <= set(db.table_names())


def test_queued_exchanges_are_committed_on_close(tmp_path):
    store = Store(tmp_path / "a.db")
    for i in range(500):
        _exchange(store, f"r{i}")
    store.close()
    assert sqlite_utils.Database(tmp_path / "a.db")["exchanges"].count == 500


def test_feedback_replaces_per_user_and_a_failed_write_spares_its_batch(tmp_path):
    async def run():
        store = Store(tmp_path / "a.db")
        _exchange(store, "r1", version=3)
        fid, replaced, version = await store.record_feedback(FeedbackInput("r1", "up", user_id="u"))
        assert (replaced, version) == (False, 3)
        fid2, replaced, _ = await store.record_feedback(FeedbackInput("r1", "down", user_id="u"))
        assert (fid2, replaced) == (fid, True)
        bad = store.record_feedback(FeedbackInput("missing", "up"))
        good = store.record_feedback(FeedbackInput("r1", "up", user_id="v"))
        with pytest.raises(NotFound):
            await bad
        assert (await good)[1] is False
        rows = await store.stats()
        store.close()
        return rows

    assert asyncio.run(run()) == [{"adapter_version": 3, "exchanges": 1, "ratings_up": 1, "ratings_down": 1}]


def test_rollback_target_skips_rolled_back_versions(tmp_path):
    async def run():
        store = Store(tmp_path / "a.db")
        for _ in range(3):
            await store.add_adapter(lambda v: AdapterRecord(v, f"/a/v{v}", "m"))
        await store.record_promotion(1, 0, "promote")
        await store.record_promotion(2, 1, "promote")
        await store.record_promotion(3, 2, "promote")
        first = await store.rollback_target(3)
        await store.record_promotion(first, 3, "rollback")
        second = await store.rollback_target(first)
        await store.record_promotion(second, first, "rollback")
        third = await store.rollback_target(second)
        statuses = {a.version: a.status for a in await store.list_adapters()}
        store.close()
        return first, second, third, statuses

    assert asyncio.run(run()) == (2, 1, 0, {1: "promoted", 2: "rolled_back", 3: "rolled_back"})
