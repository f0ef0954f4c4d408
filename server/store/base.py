"""The store's machinery: one writer thread that commits writes in order, in batches (group commit), so the
event loop never blocks on disk and awaiting a write returns once it is committed; reads in worker threads."""

from __future__ import annotations

import asyncio
import queue
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import sqlite_utils

from ..auth import Principal
from ..domain import Audit
from .schema import immediate, open_db, utc_now

Job = Callable[[sqlite_utils.Database], Any]


class StoreBase:
    """Reads run in worker threads; writes in the writer thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
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
            try:
                with immediate(db):  # the write lock from BEGIN on: a tuner's commit cannot fail this batch
                    for fn, _ in jobs:
                        try:
                            with db.atomic():  # a savepoint: one failed job must not lose its batch
                                results.append((fn(db), None))
                        except Exception as exc:
                            results.append((None, exc))
            except Exception as exc:  # the commit itself failed: nothing in the batch is stored
                results = [(None, exc)] * len(jobs)
            for (_, future), (result, exc) in zip(jobs, results):
                future.set_exception(exc) if exc else future.set_result(result)
            if None in batch:
                db.close()
                return

    def submit(self, fn: Job) -> Future:
        """Queues a write; the future resolves once it is committed."""
        future: Future = Future()
        self._queue.put((fn, future))
        return future

    async def _write(self, fn: Job) -> Any:
        return await asyncio.wrap_future(self.submit(fn))

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


def audit(db: sqlite_utils.Database, actor: Principal, action: Audit, target: str) -> None:
    db["audit"].insert({"at": utc_now(), "key_id": actor.key_id, "app_id": actor.app_id, "action": action.name.lower(),
                        "target": target})
