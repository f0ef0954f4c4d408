"""SQLite store: exchanges, feedback, the adapter registry and promotions; WAL, versioned migrations.

All writes go through one writer thread, in order, batched into transactions, so the event loop never
blocks on disk. Awaiting a write returns only after its transaction is committed.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sqlite3
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from .domain import AdapterRecord, Completion, FeedbackInput, GenerationRequest
from .errors import FailedPrecondition, NotFound


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _migration_1(db: sqlite_utils.Database) -> None:
    db["exchanges"].create({
        "id": str, "created_at": str, "app_id": str, "user_id": str, "messages_json": str,
        "sampling_json": str, "response": str, "adapter_version": int, "prompt_tokens": int,
        "completion_tokens": int, "ttft_seconds": float, "latency_seconds": float, "finish_reason": str,
    }, pk="id")
    db["exchanges"].create_index(["adapter_version"])
    db["exchanges"].create_index(["created_at"])
    db["feedback"].create({
        "id": str, "response_id": str, "user_id": str, "rating": str, "comment": str,
        "correction": str, "created_at": str, "updated_at": str,
    }, pk="id", foreign_keys=[("response_id", "exchanges", "id")])
    db["feedback"].create_index(["response_id", "user_id"], unique=True)
    db["feedback"].create_index(["updated_at"])
    db["adapters"].create({
        "version": int, "path": str, "base_model": str, "parent_version": int, "status": str,
        "created_at": str, "promoted_at": str, "metadata_json": str,
    }, pk="version")
    db["promotions"].create({"id": int, "version": int, "previous_version": int, "kind": str, "at": str},
                            pk="id")
    # Filled by the tuner: one row per tuning run, whatever its outcome.
    db["tuning_runs"].create({
        "id": int, "status": str, "started_at": str, "finished_at": str, "candidate_version": int,
        "metadata_json": str,
    }, pk="id")


def _migration_2(db: sqlite_utils.Database) -> None:
    """Tuning runs as the tuner reports them, and operators' requests for a run."""
    runs = db["tuning_runs"]
    for column, kind in [("trigger", str), ("data_until", str), ("step", int), ("total_steps", int),
                         ("loss", float), ("examples", int), ("error", str), ("updated_at", str)]:
        runs.add_column(column, kind)
    db["tuning_requests"].create({"id": int, "requested_at": str, "consumed_at": str}, pk="id")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migration_1, _migration_2]


def open_db(path: Path) -> sqlite_utils.Database:
    """Opens (creating and migrating if needed) the database at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite_utils.Database(sqlite3.connect(path, timeout=30, check_same_thread=False))
    db.enable_wal()
    db.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives power loss, not just a crash
    db.execute("PRAGMA foreign_keys=ON")
    current = db.execute("PRAGMA user_version").fetchone()[0]
    for number, migrate in enumerate(MIGRATIONS[current:], start=current + 1):
        with db.atomic():
            migrate(db)
            db.execute(f"PRAGMA user_version={number}")
    return db


class Store:
    """The service's persistent state. Reads run in worker threads; writes in the writer thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        open_db(path).close()
        self._queue: queue.Queue[tuple[Callable[[sqlite_utils.Database], Any], Future] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ writer thread

    def _write_loop(self) -> None:
        db = open_db(self.path)
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty() and len(batch) < 256:
                batch.append(self._queue.get_nowait())
            stop = None in batch
            jobs = [job for job in batch if job is not None]
            results: list[tuple[Any, BaseException | None]] = []
            try:
                with db.atomic():
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
            if stop:
                db.close()
                return

    def _submit(self, fn: Callable[[sqlite_utils.Database], Any]) -> Future:
        future: Future = Future()
        self._queue.put((fn, future))
        return future

    async def _write(self, fn: Callable[[sqlite_utils.Database], Any]) -> Any:
        return await asyncio.wrap_future(self._submit(fn))

    def close(self) -> None:
        """Commits everything queued, then stops the writer. Safe to call twice."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()

    async def _read(self, fn: Callable[[sqlite_utils.Database], Any]) -> Any:
        def run() -> Any:
            db = sqlite_utils.Database(self.path)
            try:
                return fn(db)
            finally:
                db.close()
        return await asyncio.to_thread(run)

    # ------------------------------------------------------------------ exchanges and feedback

    def log_exchange(self, request: GenerationRequest, completion: Completion) -> Future:
        """Queues an exchange for writing; returns at once (the future resolves on commit)."""
        row = {
            "id": completion.response_id, "created_at": utc_now(), "app_id": request.app_id,
            "user_id": request.user_id, "messages_json": json.dumps(request.messages),
            "sampling_json": json.dumps(request.sampling.__dict__, default=list), "response": completion.text,
            "adapter_version": completion.adapter_version, "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens, "ttft_seconds": completion.ttft_seconds,
            "latency_seconds": completion.latency_seconds, "finish_reason": completion.finish_reason,
        }
        return self._submit(lambda db: db["exchanges"].insert(row))

    async def record_feedback(self, fb: FeedbackInput) -> tuple[str, bool, int]:
        """Stores a rating (replacing the same user's earlier one); returns (id, replaced, adapter_version)."""

        def write(db: sqlite_utils.Database) -> tuple[str, bool, int]:
            exchange = db.execute("SELECT adapter_version FROM exchanges WHERE id = ?", [fb.response_id]).fetchone()
            if exchange is None:
                raise NotFound(f"no response with id {fb.response_id!r}")
            old = db.execute("SELECT id FROM feedback WHERE response_id = ? AND user_id = ?",
                             [fb.response_id, fb.user_id]).fetchone()
            now = utc_now()
            row = {"id": old[0] if old else uuid.uuid4().hex, "response_id": fb.response_id, "user_id": fb.user_id,
                   "rating": fb.rating, "comment": fb.comment, "correction": fb.correction, "updated_at": now}
            if old:
                db["feedback"].update(old[0], row)
            else:
                db["feedback"].insert({**row, "created_at": now})
            return row["id"], old is not None, exchange[0]

        return await self._write(write)

    async def stats(self) -> list[dict]:
        """Exchanges and ratings per adapter version."""
        sql = """
            SELECT e.adapter_version AS adapter_version, COUNT(DISTINCT e.id) AS exchanges,
                   COUNT(CASE WHEN f.rating = 'up' THEN 1 END) AS ratings_up,
                   COUNT(CASE WHEN f.rating = 'down' THEN 1 END) AS ratings_down
            FROM exchanges e LEFT JOIN feedback f ON f.response_id = e.id
            GROUP BY e.adapter_version ORDER BY e.adapter_version"""
        return await self._read(lambda db: [dict(r) for r in db.query(sql)])

    # ------------------------------------------------------------------ adapters and promotions

    async def add_adapter(self, make: Callable[[int], AdapterRecord]) -> AdapterRecord:
        """Allocates the next version number, builds its record with make(version), inserts it."""

        def write(db: sqlite_utils.Database) -> AdapterRecord:
            version = db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM adapters").fetchone()[0]
            record = make(version)
            db["adapters"].insert(record.to_row())
            return record

        return await self._write(write)

    async def list_adapters(self) -> list[AdapterRecord]:
        rows = await self._read(lambda db: list(db["adapters"].rows_where(order_by="version DESC")))
        return [AdapterRecord.from_row(r) for r in rows]

    async def get_adapter(self, version: int) -> AdapterRecord:
        rows = await self._read(lambda db: list(db["adapters"].rows_where("version = ?", [version])))
        if not rows:
            raise NotFound(f"no adapter version {version}")
        return AdapterRecord.from_row(rows[0])

    async def record_promotion(self, version: int, previous: int, kind: str) -> None:
        """Commits that `version` now serves (0: the base), replacing `previous`."""

        def write(db: sqlite_utils.Database) -> None:
            now = utc_now()
            db["promotions"].insert({"version": version, "previous_version": previous, "kind": kind, "at": now})
            if previous:
                status = "rolled_back" if kind == "rollback" else "retired"
                db["adapters"].update(previous, {"status": status})
            if version:
                db["adapters"].update(version, {"status": "promoted", "promoted_at": now})

        await self._write(write)

    async def record_evaluation(self, version: int, scores: dict, passed: bool) -> AdapterRecord:
        """Stores a candidate's gate scores; a failed one becomes 'rejected' for good."""

        def write(db: sqlite_utils.Database) -> AdapterRecord:
            rows = list(db["adapters"].rows_where("version = ?", [version]))
            if not rows:
                raise NotFound(f"no adapter version {version}")
            record = AdapterRecord.from_row(rows[0])
            if not passed and record.status != "registered":
                raise FailedPrecondition(f"adapter version {version} is {record.status}; only a registered "
                                         "version can be rejected")
            record.metadata["evaluation"] = scores
            record.status = record.status if passed else "rejected"
            db["adapters"].update(version, {"metadata_json": record.to_row()["metadata_json"],
                                            "status": record.status})
            return record

        return await self._write(write)

    async def request_tuning(self) -> None:
        await self._write(lambda db: db["tuning_requests"].insert({"requested_at": utc_now(), "consumed_at": ""}))

    async def tuning_status(self, limit: int) -> tuple[list[dict], bool]:
        """The newest tuning runs, and whether a requested run has not started yet."""

        def read(db: sqlite_utils.Database) -> tuple[list[dict], bool]:
            runs = list(db["tuning_runs"].rows_where(order_by="id DESC", limit=limit))
            pending = db.execute("SELECT COUNT(*) FROM tuning_requests WHERE consumed_at = ''").fetchone()[0]
            return runs, pending > 0

        return await self._read(read)

    async def promoted_version(self) -> int:
        rows = await self._read(lambda db: db.execute(
            "SELECT version FROM promotions ORDER BY id DESC LIMIT 1").fetchall())
        return rows[0][0] if rows else 0

    async def rollback_target(self, current: int) -> int:
        """The most recently served version other than `current` that was not rolled back; 0 if none."""
        sql = """SELECT p.version FROM promotions p LEFT JOIN adapters a ON a.version = p.version
                 WHERE p.version != ? AND (p.version = 0 OR a.status NOT IN ('rolled_back', 'rejected'))
                 ORDER BY p.id DESC LIMIT 1"""
        rows = await self._read(lambda db: db.execute(sql, [current]).fetchall())
        return rows[0][0] if rows else 0
