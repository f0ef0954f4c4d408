"""API keys as a use case: creating, listing and revoking them, with the in-memory keyring kept in step with
the store; and the keys `serve` makes for itself (its first admin key, its tuner's)."""

from __future__ import annotations

import logging
from pathlib import Path

from instructd.v1 import instructd_pb2 as pb

from .auth import Keyring, KeyRecord, Principal, Role, new_key, read_key_file, write_key_file
from .errors import InvalidRequest
from .store import Store, utc_now

log = logging.getLogger(__name__)
LOCAL_ADMIN_APP, TUNER_APP = "default", "instructd-tuner"


class Access:
    def __init__(self, store: Store, keyring: Keyring) -> None:
        self.store, self.keyring = store, keyring

    @classmethod
    async def open(cls, store: Store) -> Access:
        def touch(key_id: str) -> None:
            store.touch_key(key_id).add_done_callback(
                lambda f: f.exception() and log.warning("could not record a key's use: %s", f.exception()))
        return cls(store, Keyring(await store.list_keys(), touch))

    async def create_key(self, app_id: str, role: int, name: str, actor: Principal | None,
                         secret: str = "") -> tuple[KeyRecord, str]:
        """A new key, or (secret given) one made on another replica, registered here too."""
        if role not in (r.value for r in Role):
            raise InvalidRequest("role must be ROLE_APP, ROLE_TUNER or ROLE_ADMIN")
        record, secret = new_key(app_id, Role(role), name, utc_now(), secret)
        await self.store.add_key(record, actor)
        self.keyring.add(record)
        return record, secret

    async def list_keys(self) -> list[KeyRecord]:
        return await self.store.list_keys()

    async def revoke_key(self, key_id: str, actor: Principal) -> KeyRecord:
        await self.store.revoke_key(key_id, actor)  # NotFound for an unknown id
        self.keyring.remove(key_id)
        return next(k for k in await self.store.list_keys() if k.id == key_id)

    async def local_admin_key(self, path: Path) -> None:
        """On a fresh server (no valid admin key at all), makes one and writes it to `path`, readable by its
        owner only: the newcomer's CLI on this machine finds it there."""
        if self.keyring.has_admin():
            return
        _, secret = await self.create_key(LOCAL_ADMIN_APP, pb.ROLE_ADMIN, "local admin (made by instructd serve)",
                                          None)
        write_key_file(path, secret)
        log.info("made an admin API key: %s (mode 0600; the CLI on this machine uses it by itself)", path)

    async def tuner_key(self, path: Path) -> str:
        """The key of the tuner that `serve` starts: the one in `path` while it is valid, else a new one."""
        secret = read_key_file(path)
        found = self.keyring.find(secret) if secret else None
        if found and found.role is Role.TUNER:
            return secret
        _, secret = await self.create_key(TUNER_APP, pb.ROLE_TUNER, "tuner started by instructd serve", None)
        write_key_file(path, secret)
        return secret
