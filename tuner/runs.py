"""The tuner's record of its runs, kept in the server's store (tuning_runs), where the server reads it
for `instructd tune --status` and /metrics. Also the scheduler's questions to the store."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import sqlite_utils

from instructd.server.schema import immediate, utc_now

FINISHED_WITH_DATA = ("promoted", "rejected")  # runs whose data the next run does not learn from again


class RunLog:
    def __init__(self, db_path: Path) -> None:
        if not db_path.is_file():
            raise FileNotFoundError(f"no instructd store at {db_path}: start the server first (instructd serve)")
        self._db = sqlite_utils.Database(sqlite3.connect(db_path, timeout=30, check_same_thread=False,
                                                         isolation_level=None))
        self._last_progress = 0.0

    def start(self, trigger: str) -> int:
        now = utc_now()
        with immediate(self._db):
            table = self._db["tuning_runs"].insert({"status": "running", "trigger": trigger, "started_at": now,
                                                    "updated_at": now, "finished_at": "", "metadata_json": "{}"})
        return table.last_pk

    def progress(self, run_id: int, step: int, total: int, loss: float) -> None:
        """Records training progress, at most every two seconds (and always the last step)."""
        if step < total and time.monotonic() - self._last_progress < 2:
            return
        self._last_progress = time.monotonic()
        self._update(run_id, step=step, total_steps=total, loss=loss)

    def set_candidate(self, run_id: int, version: int) -> None:
        self._update(run_id, candidate_version=version)

    def finish(self, run_id: int, status: str, detail: dict, **fields) -> None:
        self._update(run_id, status=status, finished_at=utc_now(), metadata_json=json.dumps(detail, default=str),
                     **fields)

    def _update(self, run_id: int, **fields) -> None:
        with immediate(self._db):
            self._db["tuning_runs"].update(run_id, {**fields, "updated_at": utc_now()})

    def last_data_until(self) -> str:
        """Ratings up to this time were learned from already ('' when no run has been judged)."""
        placeholders = ",".join("?" for _ in FINISHED_WITH_DATA)
        row = self._db.execute(f"SELECT MAX(data_until) FROM tuning_runs WHERE status IN ({placeholders})",
                               FINISHED_WITH_DATA).fetchone()
        return row[0] or ""

    def new_ratings(self, since: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM feedback WHERE updated_at > ?", [since]).fetchone()[0]

    def take_request(self) -> bool:
        """Consumes pending `tune --now` requests; True if there was one."""
        with immediate(self._db):
            cursor = self._db.execute("UPDATE tuning_requests SET consumed_at = ? WHERE consumed_at = ''",
                                      [utc_now()])
        return cursor.rowcount > 0

    def mark_interrupted(self) -> list[int]:
        """Runs left 'running' by a tuner that died: marked failed; returns their ids."""
        ids = [r[0] for r in self._db.execute("SELECT id FROM tuning_runs WHERE status = 'running'").fetchall()]
        for run_id in ids:
            self.finish(run_id, "failed", {"error": "interrupted: the tuner stopped during this run"})
        return ids
