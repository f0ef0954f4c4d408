"""The store on a real SQLite file: migrations, durability, feedback replacement, rollback targets."""

from __future__ import annotations

import asyncio

import pytest
import sqlite_utils

from instructd.server.auth import Principal, Role
from instructd.server.domain import AdapterChoice, Completion, FeedbackInput, GenerationRequest, Sampling
from instructd.server.records import AdapterRecord
from instructd.server.errors import NotFound
from instructd.server.store.schema import MIGRATIONS
from instructd.server.store import Store

OPERATOR = Principal("k1", "ops", Role.ADMIN)


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
        rows = await store.stats(None)
        store.close()
        return rows

    assert asyncio.run(run()) == [{"app_id": "default", "adapter_version": 3, "exchanges": 1, "ratings_up": 1,
                                   "ratings_down": 1}]


def test_rollback_target_skips_rolled_back_versions(tmp_path):
    async def run():
        store = Store(tmp_path / "a.db")
        for _ in range(3):
            staged = tmp_path / "staged"
            staged.mkdir()
            await store.add_adapter(staged, tmp_path, lambda v, folder: AdapterRecord(v, str(folder), "m"), OPERATOR)
        await store.record_promotion(1, 0, "promote", OPERATOR)
        await store.record_promotion(2, 1, "promote", OPERATOR)
        await store.record_promotion(3, 2, "promote", OPERATOR)
        first = await store.rollback_target(3)
        await store.record_promotion(first, 3, "rollback", OPERATOR)
        second = await store.rollback_target(first)
        await store.record_promotion(second, first, "rollback", OPERATOR)
        third = await store.rollback_target(second)
        statuses = {a.version: a.status.stored for a in await store.list_adapters()}
        store.close()
        return first, second, third, statuses

    assert asyncio.run(run()) == (2, 1, 0, {1: "promoted", 2: "rolled_back", 3: "rolled_back"})


def test_another_writer_never_fails_a_batch(tmp_path):
    """Another process writes the same file (the CLI's `forget`, a migration). A batch that read first and wrote
    later, in a deferred transaction, failed at once (SQLITE_BUSY) whenever the other writer committed in between."""
    import sqlite3
    import threading
    import time

    store = Store(tmp_path / "a.db")
    for i in range(50):
        _exchange(store, f"r{i}")
    stop, commits = threading.Event(), []

    def other_writer() -> None:  # read, then write, commit, again and again
        db = sqlite3.connect(tmp_path / "a.db", timeout=30, isolation_level=None)
        while not stop.is_set():
            db.execute("BEGIN IMMEDIATE")
            db.execute("SELECT COUNT(*) FROM tuning_runs").fetchone()
            db.execute("INSERT INTO tuning_requests (requested_at, consumed_at) VALUES ('now', '')")
            db.execute("COMMIT")
            commits.append(1)
            time.sleep(0.001)
        db.close()

    async def rate() -> list:
        """2000 ratings in waves of 100; each wave waits for the other writer to commit once more, so the two
        interleave however fast the batches are (a burst of group commits can hold the lock until it is over)."""
        results = []
        for wave in range(20):
            seen, deadline = len(commits), time.monotonic() + 60
            results += await asyncio.gather(*(store.record_feedback(FeedbackInput(f"r{i % 50}", "up", user_id=f"u{i}"))
                                              for i in range(wave * 100, (wave + 1) * 100)), return_exceptions=True)
            while len(commits) == seen:
                assert time.monotonic() < deadline, "the other writer never got the lock"
                await asyncio.sleep(0.001)
        return results

    thread = threading.Thread(target=other_writer)
    thread.start()
    try:
        results = asyncio.run(rate())
    finally:
        stop.set()
        thread.join()
        store.close()
    assert not [r for r in results if isinstance(r, BaseException)]
    db = sqlite3.connect(tmp_path / "a.db")
    assert db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 2000
    assert db.execute("SELECT COUNT(*) FROM tuning_requests").fetchone()[0] == len(commits)


def test_forget_leaves_no_trace_of_the_user(tmp_path):
    async def run():
        store = Store(tmp_path / "a.db")
        for rid, app, user in [("a1", "A", "mallory"), ("a2", "A", "bob"), ("b1", "B", "mallory")]:
            request = GenerationRequest(({"role": "user", "content": "hi"},), Sampling(), AdapterChoice(), user, app)
            await asyncio.wrap_future(store.log_exchange(request, Completion(rid, "hello", "stop", 3, 1, 0)))
        await store.record_feedback(FeedbackInput("a2", "up", user_id="mallory", app_id="A"))  # mallory rates bob's
        await store.record_feedback(FeedbackInput("a2", "down", user_id="bob", app_id="A"))
        await store.record_feedback(FeedbackInput("a1", "up", user_id="bob", app_id="A"))       # bob rates mallory's
        forgotten = await store.forget("A", "mallory", OPERATOR)
        store.close()
        return forgotten

    assert asyncio.run(run()) == (1, 2)
    db = sqlite_utils.Database(tmp_path / "a.db")
    dump = "\n".join(db.iterdump())
    in_a = [line for line in dump.splitlines() if "'A'" in line or "\"A\"" in line]
    assert not [line for line in in_a if "mallory" in line]
    assert [r["id"] for r in db["exchanges"].rows] == ["a2", "b1"]  # app B's mallory is another tenant's user
    assert [(r["user_id"], r["rating"]) for r in db["feedback"].rows] == [("bob", "down")]
