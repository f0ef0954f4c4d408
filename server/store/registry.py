"""The adapter registry: immutable versions, their evaluations, and the promotions and rollbacks between them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import sqlite_utils

from instructd.v1 import instructd_pb2 as pb

from ..auth import Principal
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
