"""The adapter registry: immutable versions, their evaluations, and the promotions and rollbacks between them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import sqlite_utils

from instructd.v1 import instructd_pb2 as pb

from ..auth import Principal
from ..canary import CanaryOutcome, CanaryRecord, Tally
from ..domain import Audit
from ..errors import FailedPrecondition, NotFound
from ..records import AdapterRecord, AdapterStatus, message_to_json
from .base import StoreBase, audit
from .schema import utc_now


class RegistryTables(StoreBase):
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
            audit(db, actor, Audit.ADAPTER_REGISTERED, f"v{version}")
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
                status = AdapterStatus.ROLLED_BACK if kind == "rollback" else AdapterStatus.RETIRED
                db["adapters"].update(previous, {"status": status.stored})
            if version:
                db["adapters"].update(version, {"status": AdapterStatus.PROMOTED.stored, "promoted_at": now})
            action = Audit.ROLLED_BACK if kind == "rollback" else Audit.PROMOTED
            audit(db, actor, action, f"v{previous} -> v{version}")

        await self._write(write)

    async def record_evaluation(self, version: int, verdict: pb.Verdict, actor: Principal) -> AdapterRecord:
        """Stores a candidate's verdict; a failed one becomes rejected for good."""

        def write(db: sqlite_utils.Database) -> AdapterRecord:
            rows = list(db["adapters"].rows_where("version = ?", [version]))
            if not rows:
                raise NotFound(f"no adapter version {version}")
            record = AdapterRecord.from_row(rows[0])
            if not verdict.passed and record.status is not AdapterStatus.REGISTERED:
                raise FailedPrecondition(f"adapter version {version} is {record.status.stored}; only a registered "
                                         "version can be rejected")
            record.evaluation = verdict
            record.status = record.status if verdict.passed else AdapterStatus.REJECTED
            db["adapters"].update(version, {"verdict_json": message_to_json(verdict), "status": record.status.stored})
            audit(db, actor, Audit.EVALUATION_RECORDED, f"v{version} {'passed' if verdict.passed else 'rejected'}")
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

    async def start_canary(self, version: int, incumbent: int, share: float, actor: Principal) -> CanaryRecord:
        """Records that `version` serves a share of users beside `incumbent` (ending any canary still running)."""

        def write(db: sqlite_utils.Database) -> CanaryRecord:
            _end_canaries(db, CanaryOutcome.ENDED, actor)
            row = {"version": version, "incumbent": incumbent, "share": share, "started_at": utc_now()}
            canary_id = db["canaries"].insert({**row, "ended_at": "", "outcome": ""}).last_pk
            db["adapters"].update(version, {"status": AdapterStatus.CANARY.stored})
            audit(db, actor, Audit.CANARY_STARTED, f"v{version} beside v{incumbent}, {share:.0%} of users")
            return CanaryRecord(canary_id, **row)

        return await self._write(write)

    async def end_canary(self, outcome: CanaryOutcome, actor: Principal) -> None:
        """Ends the canary that runs, if any. Its candidate goes back to registered, or to rolled back when it was
        clearly worse; a promoted one is marked by record_promotion."""
        await self._write(lambda db: _end_canaries(db, outcome, actor))

    async def active_canary(self) -> CanaryRecord | None:
        rows = await self._read(lambda db: list(db["canaries"].rows_where("outcome = ''", order_by="id DESC")))
        if not rows:
            return None
        r = rows[0]
        return CanaryRecord(r["id"], r["version"], r["incumbent"], r["share"], r["started_at"])

    async def canary_tally(self, canary: CanaryRecord) -> tuple[Tally, set[str]]:
        """Ratings of the answers the candidate and the incumbent gave since the canary started, and the users the
        candidate answered (each request without a user id counts as one, as canary.audience names it)."""
        # From the ratings given since it started (a rating comes after its answer; CROSS JOIN keeps that order), not
        # from every answer of either version: looked at every second, this reads only the rows rated meanwhile.
        ratings = """SELECT e.adapter_version, f.rating, COUNT(*) FROM feedback f
                     CROSS JOIN exchanges e ON e.id = f.response_id
                     WHERE f.updated_at >= ?1 AND e.created_at >= ?1 AND e.adapter_version IN (?2, ?3) GROUP BY 1, 2"""
        users = """SELECT DISTINCT CASE user_id WHEN '' THEN '#' || id ELSE user_id END FROM exchanges
                   WHERE created_at >= ? AND adapter_version = ?"""  # as canary.audience names them

        def read(db: sqlite_utils.Database) -> tuple[Tally, set[str]]:
            counts = {(v, r): n for v, r, n in db.execute(ratings, [canary.started_at, canary.version,
                                                                     canary.incumbent])}
            exposed = {u for (u,) in db.execute(users, [canary.started_at, canary.version])}
            return Tally(counts.get((canary.version, "up"), 0), counts.get((canary.version, "down"), 0),
                         counts.get((canary.incumbent, "up"), 0), counts.get((canary.incumbent, "down"), 0)), exposed

        return await self._read(read)


def _end_canaries(db: sqlite_utils.Database, outcome: CanaryOutcome, actor: Principal) -> None:
    for row in list(db["canaries"].rows_where("outcome = ''")):
        db["canaries"].update(row["id"], {"ended_at": utc_now(), "outcome": outcome.value})
        if outcome is not CanaryOutcome.PROMOTED:
            status = AdapterStatus.ROLLED_BACK if outcome is CanaryOutcome.ROLLED_BACK else AdapterStatus.REGISTERED
            db["adapters"].update(row["version"], {"status": status.stored})
        audit(db, actor, Audit.CANARY_ENDED, f"v{row['version']} {outcome.value}")
