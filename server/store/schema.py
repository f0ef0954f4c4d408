"""The store's schema: its tables, their migrations (in order, once each) and how a connection is opened.
Only the store (store.py) uses it; nothing else writes SQL against instructd's tables."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils


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


def _migration_3(db: sqlite_utils.Database) -> None:
    """Keys and the audit log; who (application, key) made each exchange, rating, adapter and run."""
    db["exchanges"].add_column("key_id", str)
    db["exchanges"].create_index(["app_id", "user_id"])
    db["feedback"].add_column("app_id", str)
    db["feedback"].add_column("key_id", str)
    db["feedback"].create_index(["user_id"])
    for table in ("adapters", "tuning_runs"):
        db[table].add_column("app_id", str)
        db[table].add_column("created_by_key", str)
    db["keys"].create({"id": str, "app_id": str, "role": str, "name": str, "digest": str, "created_at": str,
                       "last_used_at": str, "revoked_at": str}, pk="id")
    db["audit"].create({"id": int, "at": str, "key_id": str, "app_id": str, "action": str, "target": str}, pk="id")


def _migration_4(db: sqlite_utils.Database) -> None:
    """The export cursor (a sequence number bumped by every rating written), typed statuses and verdicts, the
    checksum of each adapter's weights: what a tuner elsewhere needs through the API."""
    db["feedback"].add_column("seq", int)
    db.execute("""UPDATE feedback SET seq = (SELECT COUNT(*) FROM feedback f
                  WHERE (f.updated_at, f.id) <= (feedback.updated_at, feedback.id))""")
    db["feedback"].create_index(["seq"], unique=True)
    db["adapters"].add_column("sha256", str)
    db["adapters"].add_column("verdict_json", str)
    for column, kind in [("data_json", str), ("verdict_json", str), ("reason", str), ("cursor", int)]:
        db["tuning_runs"].add_column(column, kind)
    db.execute("""UPDATE tuning_runs SET cursor = (SELECT COALESCE(MAX(seq), 0) FROM feedback
                  WHERE updated_at <= tuning_runs.data_until), reason = COALESCE(
                  json_extract(metadata_json, '$.reason'), json_extract(metadata_json, '$.error'), '')""")


def _migration_5(db: sqlite_utils.Database) -> None:
    """Settings a server keeps about itself (its replica id)."""
    db["settings"].create({"name": str, "value": str}, pk="name")


def _migration_6(db: sqlite_utils.Database) -> None:
    """Canaries: a candidate serving a share of users until their ratings decide (outcome empty while it runs)."""
    db["canaries"].create({"id": int, "version": int, "incumbent": int, "share": float, "started_at": str,
                           "ended_at": str, "outcome": str}, pk="id")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migration_1, _migration_2, _migration_3, _migration_4,
                                                             _migration_5, _migration_6]


def open_db(path: Path) -> sqlite_utils.Database:
    """Opens (creating and migrating if needed) the database at `path`; only its owner may read it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():  # created 0600 from the start; SQLite gives its -wal and -shm files the same mode
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    db = sqlite_utils.Database(sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None))
    db.enable_wal()
    db.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives power loss, not just a crash
    db.execute("PRAGMA foreign_keys=ON")
    current = db.execute("PRAGMA user_version").fetchone()[0]
    for number, migrate in enumerate(MIGRATIONS[current:], start=current + 1):
        with immediate(db):
            migrate(db)
            db.execute(f"PRAGMA user_version={number}")
    return db


@contextlib.contextmanager
def immediate(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """A write transaction that takes the write lock at BEGIN. A deferred one that reads first and writes
    later fails at once (SQLITE_BUSY, no waiting) if another connection committed in between."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
