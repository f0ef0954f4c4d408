"""SQLite store: exchanges, feedback, the adapter registry and promotions, keys and the audit log.

All writes go through one writer thread, in order, batched into transactions (group commit), so the event
loop never blocks on disk. Awaiting a write returns only after its transaction is committed. Every admin or
tuner action is written together with its audit row, in the same transaction.
"""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import sqlite_utils

from .auth import KeyRecord, Principal, Role
from .domain import AdapterRecord, Audit, Completion, FeedbackInput, GenerationRequest
from .errors import FailedPrecondition, InvalidRequest, NotFound, preview
from .schema import immediate, open_db, utc_now

Job = Callable[[sqlite_utils.Database], Any]


class Store:
    """The service's persistent state. Reads run in worker threads; writes in the writer thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        open_db(path).close()
        self._queue: queue.Queue[tuple[Job, Future] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ writer thread

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

    async def _read(self, fn: Job) -> Any:
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
            "key_id": request.key_id, "user_id": request.user_id, "messages_json": json.dumps(request.messages),
            "sampling_json": json.dumps(request.sampling.__dict__, default=list), "response": completion.text,
            "adapter_version": completion.adapter_version, "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens, "ttft_seconds": completion.ttft_seconds,
            "latency_seconds": completion.latency_seconds, "finish_reason": completion.finish_reason,
        }
        return self.submit(lambda db: db["exchanges"].insert(row))

    async def record_feedback(self, fb: FeedbackInput) -> tuple[str, bool, int]:
        """Stores a rating (replacing the same user's earlier one); returns (id, replaced, adapter_version)."""

        def write(db: sqlite_utils.Database) -> tuple[str, bool, int]:
            exchange = db.execute("SELECT adapter_version, app_id FROM exchanges WHERE id = ?",
                                  [fb.response_id]).fetchone()
            if exchange is None or exchange[1] != fb.app_id:  # another application's answer: not yours to see
                raise NotFound(f"no response with id {preview(fb.response_id)}")
            old = db.execute("SELECT id FROM feedback WHERE response_id = ? AND user_id = ?",
                             [fb.response_id, fb.user_id]).fetchone()
            now = utc_now()
            row = {"id": old[0] if old else uuid.uuid4().hex, "response_id": fb.response_id, "user_id": fb.user_id,
                   "rating": fb.rating, "comment": fb.comment, "correction": fb.correction, "updated_at": now,
                   "app_id": fb.app_id, "key_id": fb.key_id}
            if old:
                db["feedback"].update(old[0], row)
            else:
                db["feedback"].insert({**row, "created_at": now})
            return row["id"], old is not None, exchange[0]

        return await self._write(write)

    async def stats(self, app_id: str | None) -> list[dict]:
        """Exchanges and ratings per application and adapter version; one application's, or (None) all."""
        sql = """
            SELECT e.app_id AS app_id, e.adapter_version AS adapter_version, COUNT(DISTINCT e.id) AS exchanges,
                   COUNT(CASE WHEN f.rating = 'up' THEN 1 END) AS ratings_up,
                   COUNT(CASE WHEN f.rating = 'down' THEN 1 END) AS ratings_down
            FROM exchanges e LEFT JOIN feedback f ON f.response_id = e.id
            WHERE :app IS NULL OR e.app_id = :app
            GROUP BY e.app_id, e.adapter_version ORDER BY e.app_id, e.adapter_version"""
        return await self._read(lambda db: [dict(r) for r in db.query(sql, {"app": app_id})])

    async def forget(self, app_id: str, user_id: str, actor: Principal) -> tuple[int, int]:
        """Deletes a user's exchanges (and every rating of them) and the user's ratings, in one application."""
        if not user_id:
            raise InvalidRequest("user_id must not be empty: anonymous exchanges belong to no one user")

        def write(db: sqlite_utils.Database) -> tuple[int, int]:
            theirs = "SELECT id FROM exchanges WHERE app_id = :app AND user_id = :user"
            ratings = db.execute(f"""DELETE FROM feedback WHERE response_id IN ({theirs}) OR (user_id = :user
                AND response_id IN (SELECT id FROM exchanges WHERE app_id = :app))""",
                                 {"app": app_id, "user": user_id}).rowcount
            exchanges = db.execute("DELETE FROM exchanges WHERE app_id = ? AND user_id = ?",
                                   [app_id, user_id]).rowcount
            _audit(db, actor, Audit.USER_FORGOTTEN, f"app {app_id}")  # never the user id: no trace of them
            return exchanges, ratings

        return await self._write(write)

    async def delete_expired(self, before: str) -> int:
        """Deletes exchanges created before `before` (and their ratings) that no adapter was trained on."""
        lineage = "SELECT j.value FROM adapters a, json_each(a.metadata_json, '$.exchange_ids') j"

        def write(db: sqlite_utils.Database) -> int:
            old = f"SELECT id FROM exchanges WHERE created_at < :before AND id NOT IN ({lineage})"
            db.execute(f"DELETE FROM feedback WHERE response_id IN ({old})", {"before": before})
            return db.execute(f"DELETE FROM exchanges WHERE id IN ({old})", {"before": before}).rowcount

        return await self._write(write)

    # ------------------------------------------------------------------ adapters and promotions

    async def add_adapter(self, staged: Path, versions_dir: Path, make: Callable[[int, Path], AdapterRecord],
                          actor: Principal) -> AdapterRecord:
        """Allocates the next version number, moves the staged copy to its folder (a rename: the copying was
        done before, outside the writer), and records it with make(version, folder)."""

        def write(db: sqlite_utils.Database) -> AdapterRecord:
            version = db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM adapters").fetchone()[0]
            folder = versions_dir / f"v{version}"
            if folder.exists():  # left by a registration that crashed before committing
                shutil.rmtree(folder)
            staged.rename(folder)
            record = make(version, folder)
            db["adapters"].insert(record.to_row())
            _audit(db, actor, Audit.ADAPTER_REGISTERED, f"v{version}")
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

    async def record_promotion(self, version: int, previous: int, kind: str, actor: Principal) -> None:
        """Commits that `version` now serves (0: the base), replacing `previous`."""

        def write(db: sqlite_utils.Database) -> None:
            now = utc_now()
            db["promotions"].insert({"version": version, "previous_version": previous, "kind": kind, "at": now})
            if previous:
                status = "rolled_back" if kind == "rollback" else "retired"
                db["adapters"].update(previous, {"status": status})
            if version:
                db["adapters"].update(version, {"status": "promoted", "promoted_at": now})
            action = Audit.ROLLED_BACK if kind == "rollback" else Audit.PROMOTED
            _audit(db, actor, action, f"v{previous} -> v{version}")

        await self._write(write)

    async def record_evaluation(self, version: int, scores: dict, passed: bool, actor: Principal) -> AdapterRecord:
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
            _audit(db, actor, Audit.EVALUATION_RECORDED, f"v{version} {'passed' if passed else 'rejected'}")
            return record

        return await self._write(write)

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

    # ------------------------------------------------------------------ tuning

    async def request_tuning(self, actor: Principal) -> None:
        def write(db: sqlite_utils.Database) -> None:
            db["tuning_requests"].insert({"requested_at": utc_now(), "consumed_at": ""})
            _audit(db, actor, Audit.TUNING_TRIGGERED, "")

        await self._write(write)

    async def tuning_status(self, limit: int) -> tuple[list[dict], bool]:
        """The newest tuning runs, and whether a requested run has not started yet."""

        def read(db: sqlite_utils.Database) -> tuple[list[dict], bool]:
            runs = list(db["tuning_runs"].rows_where(order_by="id DESC", limit=limit))
            pending = db.execute("SELECT COUNT(*) FROM tuning_requests WHERE consumed_at = ''").fetchone()[0]
            return runs, pending > 0

        return await self._read(read)

    # ------------------------------------------------------------------ keys and audit

    async def add_key(self, record: KeyRecord, actor: Principal | None) -> None:
        """Stores a new key; `actor` None: the server made it itself (its first admin key, its tuner's)."""

        def write(db: sqlite_utils.Database) -> None:
            db["keys"].insert({**record.__dict__, "role": record.role.name.lower()})
            _audit(db, actor or Principal(record.id, record.app_id, record.role), Audit.KEY_CREATED,
                   f"{record.id} ({record.role.name.lower()} of {record.app_id})")

        await self._write(write)

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._read(lambda db: list(db["keys"].rows_where(order_by="created_at")))
        return [KeyRecord(**{**r, "role": Role.parse(r["role"]), "last_used_at": r["last_used_at"] or "",
                             "revoked_at": r["revoked_at"] or ""}) for r in rows]

    async def revoke_key(self, key_id: str, actor: Principal) -> None:
        def write(db: sqlite_utils.Database) -> None:
            if not db.execute("SELECT 1 FROM keys WHERE id = ?", [key_id]).fetchone():
                raise NotFound(f"no key with id {preview(key_id)}")
            db.execute("UPDATE keys SET revoked_at = ? WHERE id = ? AND COALESCE(revoked_at, '') = ''",
                       [utc_now(), key_id])
            _audit(db, actor, Audit.KEY_REVOKED, key_id)

        await self._write(write)

    def touch_key(self, key_id: str) -> Future:
        """Records that a key was used now; returns at once."""
        return self.submit(lambda db: db.execute("UPDATE keys SET last_used_at = ? WHERE id = ?",
                                                 [utc_now(), key_id]))

    async def list_audit(self, limit: int) -> list[dict]:
        return await self._read(lambda db: list(db["audit"].rows_where(order_by="id DESC", limit=limit)))


def _audit(db: sqlite_utils.Database, actor: Principal, action: Audit, target: str) -> None:
    db["audit"].insert({"at": utc_now(), "key_id": actor.key_id, "app_id": actor.app_id, "action": action.name.lower(),
                        "target": target})
