"""The store's machinery: one writer thread that commits writes in order, in batches (group commit), so the
event loop never blocks on disk and awaiting a write returns once it is committed; reads in worker threads."""

from __future__ import annotations

import asyncio
import queue
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import sqlite_utils

from ..auth import Principal
from ..domain import Audit
from .schema import immediate, open_db, utc_now

Job = Callable[[sqlite_utils.Database], Any]
BatchObserver = Callable[[int, float], None]  # (writes in one commit, seconds to run and commit them)


class StoreBase:
    """Reads run in worker threads; writes in the writer thread."""

    def __init__(self, path: Path, on_batch: BatchObserver = lambda writes, seconds: None) -> None:
        """`on_batch` is told of each batch the writer committed, in the writer thread (it must not raise)."""
        self.path, self._on_batch = path, on_batch
        open_db(path).close()
        self._queue: queue.Queue[tuple[Job, Future] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()

    def _write_loop(self) -> None:
        db = open_db(self.path)
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty() and len(batch) < 256:
                batch.append(self._queue.get_nowait())
            jobs = [job for job in batch if job is not None]
            results: list[tuple[Any, BaseException | None]] = []
            started = time.perf_counter()
            try:
                with immediate(db):  # the write lock from BEGIN on: a tuner's commit cannot fail this batch
                    results = [_in_savepoint(db, fn) for fn, _ in jobs]
            except Exception as exc:  # the commit itself failed: nothing in the batch is stored
                results = [(None, exc)] * len(jobs)
            if jobs:  # not the closing sentinel's empty batch; told before the waiters wake, so what they see next
                self._on_batch(len(jobs), time.perf_counter() - started)  # (a metrics scrape) counts their batch
            _settle([waiter for _, waiter in jobs], results)
            if None in batch:
                db.close()
                return

    def submit(self, fn: Job) -> Future:
        """Queues a write; the future resolves once it is committed."""
        future: Future = Future()
        self._queue.put((fn, future))
        return future

    async def _write(self, fn: Job) -> Any:
        """Queues a write and waits for its commit. The writer wakes this event loop once per batch, not once per
        write: at hundreds of ratings a second, a wake-up each (a system call) was a good part of the cost."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._queue.put((fn, (loop, waiter)))
        return await waiter

    def close(self) -> None:
        """Commits everything queued, then stops the writer. Safe to call twice."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()

    async def replica_id(self, wanted: str) -> str:
        """This server's replica id: `wanted` if given (and kept), else the one kept, else a new one, kept."""

        def write(db: sqlite_utils.Database) -> str:
            kept = db.execute("SELECT value FROM settings WHERE name = 'replica_id'").fetchone()
            chosen = wanted or (kept[0] if kept else f"r{secrets.token_hex(3)}")
            db["settings"].upsert({"name": "replica_id", "value": chosen}, pk="name")
            return chosen

        return await self._write(write)

    async def _read(self, fn: Job) -> Any:
        return await asyncio.to_thread(self.read_now, fn)

    def read_now(self, fn: Job) -> Any:
        """A read on a connection of its own, in the calling thread (one that is not the event loop's)."""
        db = sqlite_utils.Database(self.path)
        try:
            return fn(db)
        finally:
            db.close()


def _in_savepoint(db: sqlite_utils.Database, fn: Job) -> tuple[Any, BaseException | None]:
    """Runs one job in a savepoint of the batch's transaction: one failed job must not lose its batch."""
    conn = db.conn
    conn.execute("SAVEPOINT job")
    try:
        result = fn(db)
    except Exception as exc:
        conn.execute("ROLLBACK TO job")
        conn.execute("RELEASE job")
        return None, exc
    conn.execute("RELEASE job")
    return result, None


def _settle(waiters: list, results: list[tuple[Any, BaseException | None]]) -> None:
    """Hands each job its outcome: a concurrent Future directly, asyncio futures in one call per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for waiter, outcome in zip(waiters, results):
        if isinstance(waiter, Future):
            waiter.set_exception(outcome[1]) if outcome[1] else waiter.set_result(outcome[0])
        else:
            loop, future = waiter
            by_loop.setdefault(loop, []).append((future, outcome))
    for loop, items in by_loop.items():
        if not loop.is_closed():
            loop.call_soon_threadsafe(_resolve, items)


def _resolve(items: list) -> None:
    for future, (result, exc) in items:
        if not future.done():  # its caller may have gone (cancelled)
            future.set_exception(exc) if exc else future.set_result(result)


def audit(db: sqlite_utils.Database, actor: Principal, action: Audit, target: str) -> None:
    db["audit"].insert({"at": utc_now(), "key_id": actor.key_id, "app_id": actor.app_id, "action": action.name.lower(),
                        "target": target})
