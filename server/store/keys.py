"""API keys (only their digests) and the audit log of admin and tuner actions."""

from __future__ import annotations

from concurrent.futures import Future

import sqlite_utils

from ..auth import KeyRecord, Principal, Role
from ..domain import Audit
from ..errors import FailedPrecondition, NotFound, preview
from .base import StoreBase, audit
from .schema import utc_now


class AccessTables(StoreBase):
    async def add_key(self, record: KeyRecord, actor: Principal | None) -> None:
        """Stores a new key; `actor` None: the server made it itself (its first admin key, its tuner's)."""

        def write(db: sqlite_utils.Database) -> None:
            if db.execute("SELECT 1 FROM keys WHERE id = ?", [record.id]).fetchone():
                raise FailedPrecondition(f"a key with id {record.id} is already registered here")
            db["keys"].insert({**record.__dict__, "role": record.role.name.lower()})
            audit(db, actor or Principal(record.id, record.app_id, record.role), Audit.KEY_CREATED,
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
            audit(db, actor, Audit.KEY_REVOKED, key_id)

        await self._write(write)

    def touch_key(self, key_id: str) -> Future:
        """Records that a key was used now; returns at once."""
        return self.submit(lambda db: db.execute("UPDATE keys SET last_used_at = ? WHERE id = ?",
                                                 [utc_now(), key_id]))

    async def list_audit(self, limit: int) -> list[dict]:
        return await self._read(lambda db: list(db["audit"].rows_where(order_by="id DESC", limit=limit)))
