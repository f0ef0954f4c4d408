"""Exchanges and their ratings: logging, rating, statistics, the export a tuner learns from, forgetting a user
and retention."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import Future

import sqlite_utils

from ..auth import Principal
from ..domain import Audit, Completion, FeedbackInput, GenerationRequest
from ..errors import InvalidRequest, NotFound, preview
from .base import StoreBase, audit
from .schema import utc_now

EXPORT_PAGE = 500  # rows per read while exporting: a long export never holds a read transaction for long
# The hot writes in plain SQL: hundreds of ratings a second go through these (sqlite-utils' insert() looks the
# table up each time, a fifth of the writer's time when measured).
_INSERT_EXCHANGE = """INSERT INTO exchanges (id, created_at, app_id, key_id, user_id, messages_json, sampling_json,
    response, adapter_version, prompt_tokens, completion_tokens, ttft_seconds, latency_seconds, finish_reason)
    VALUES (:id, :created_at, :app_id, :key_id, :user_id, :messages_json, :sampling_json, :response, :adapter_version,
    :prompt_tokens, :completion_tokens, :ttft_seconds, :latency_seconds, :finish_reason)"""
# The rated exchange, this user's earlier rating of it (if any), and the next export cursor, in one read.
_RATED = """SELECT e.adapter_version, e.app_id, f.id, (SELECT COALESCE(MAX(seq), 0) + 1 FROM feedback)
    FROM exchanges e LEFT JOIN feedback f ON f.response_id = e.id AND f.user_id = ? WHERE e.id = ?"""
_INSERT_RATING = """INSERT INTO feedback (id, response_id, user_id, rating, comment, correction, created_at,
    updated_at, app_id, key_id, seq) VALUES (:id, :response_id, :user_id, :rating, :comment, :correction, :now, :now,
    :app_id, :key_id, :seq)"""
_UPDATE_RATING = """UPDATE feedback SET rating = :rating, comment = :comment, correction = :correction,
    updated_at = :now, app_id = :app_id, key_id = :key_id, seq = :seq WHERE id = :id"""


class ExchangeTables(StoreBase):
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
        return self.submit(lambda db: db.conn.execute(_INSERT_EXCHANGE, row))

    async def record_feedback(self, fb: FeedbackInput) -> tuple[str, bool, int]:
        """Stores a rating (replacing the same user's earlier one); returns (id, replaced, adapter_version).
        Each write takes the next export cursor, so an export resumed after a cursor sees every change once."""

        def write(db: sqlite_utils.Database) -> tuple[str, bool, int]:
            found = db.conn.execute(_RATED, [fb.user_id, fb.response_id]).fetchone()
            if found is None or found[1] != fb.app_id:  # another application's answer: not yours to see
                raise NotFound(f"no response with id {preview(fb.response_id)}")
            version, _, old, seq = found
            row = {"id": old or uuid.uuid4().hex, "response_id": fb.response_id, "user_id": fb.user_id,
                   "rating": fb.rating, "comment": fb.comment, "correction": fb.correction, "now": utc_now(),
                   "app_id": fb.app_id, "key_id": fb.key_id, "seq": seq}
            db.conn.execute(_UPDATE_RATING if old else _INSERT_RATING, row)
            return row["id"], old is not None, version

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

    async def export_page(self, after: int, until: int, app_id: str) -> list[dict]:
        """Up to EXPORT_PAGE rated exchanges whose rating's cursor is in (after, until], oldest first."""
        sql = """
            SELECT f.seq AS cursor, e.id AS exchange_id, e.app_id, e.messages_json, e.response, e.finish_reason,
                   e.adapter_version, f.rating, f.correction, f.comment, f.user_id AS rater, f.updated_at AS rated_at
            FROM feedback f JOIN exchanges e ON e.id = f.response_id
            WHERE f.seq > :after AND (:until = 0 OR f.seq <= :until) AND (:app = '' OR e.app_id = :app)
            ORDER BY f.seq LIMIT :page"""
        params = {"after": after, "until": until, "app": app_id, "page": EXPORT_PAGE}
        return await self._read(lambda db: [dict(r) for r in db.query(sql, params)])

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
            audit(db, actor, Audit.USER_FORGOTTEN, f"app {app_id}")  # never the user id: no trace of them
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
