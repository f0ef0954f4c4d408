"""Adapter router: which adapter version serves a request, registration of new versions,
promotion (preload, then flip) and retirement of the old one once its requests have drained."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterator

from .adapters import check_lora, copy_version, resolve_inside
from .config import ServerConfig
from .domain import BASE_VERSION, AdapterChoice, AdapterRecord
from .engine import AdapterRef, Engine
from .errors import Conflict, FailedPrecondition
from .metrics import Metrics
from .store import Store, utc_now

log = logging.getLogger(__name__)


class AdapterRouter:
    """Owns the 'promoted' alias. Promotion is a compare-and-swap under one lock."""

    def __init__(self, config: ServerConfig, engine: Engine, store: Store, metrics: Metrics) -> None:
        self._config, self._engine, self._store, self._metrics = config, engine, store, metrics
        self._promoted: AdapterRef | None = None  # None: the base model serves
        self._in_flight: Counter[int] = Counter()
        self._drained = asyncio.Condition()
        self._lock = asyncio.Lock()

    @property
    def promoted_version(self) -> int:
        return self._promoted.version if self._promoted else BASE_VERSION

    async def restore(self) -> None:
        """On start: serve again whatever was promoted when the server last ran."""
        version = await self._store.promoted_version()
        if version:
            self._promoted = await self._loadable(version)
            await self._engine.load_adapter(self._promoted, pin=True)
        self._metrics.promoted_version.set(self.promoted_version)
        log.info("serving adapter version %s", self.promoted_version or "base")

    async def route(self, choice: AdapterChoice) -> AdapterRef | None:
        """The adapter a new request runs on; None means the base model."""
        if choice.base:
            return None
        if choice.version is None:
            return self._promoted
        if self._promoted and choice.version == self._promoted.version:
            return self._promoted
        return await self._loadable(choice.version)

    @contextlib.contextmanager
    def serving(self, adapter: AdapterRef | None) -> Iterator[None]:
        """Counts a request as in flight on `adapter`, so that it is not retired under it."""
        version = adapter.version if adapter else BASE_VERSION
        self._in_flight[version] += 1
        try:
            yield
        finally:
            self._in_flight[version] -= 1
            if not self._in_flight[version]:
                asyncio.get_running_loop().create_task(self._notify_drained())

    async def _notify_drained(self) -> None:
        async with self._drained:
            self._drained.notify_all()

    async def register(self, path: str, parent: int, metadata: dict, rejected: bool) -> AdapterRecord:
        """Validates the folder, copies it into its own version folder and records it."""
        folder = resolve_inside(path, self._config.adapter_dir)
        peft = await asyncio.to_thread(check_lora, folder, self._engine.base_config, self._engine.base_name,
                                       self._config.max_lora_rank)
        if parent:
            await self._store.get_adapter(parent)  # NotFound for an unknown parent

        def make(version: int) -> AdapterRecord:
            copy = copy_version(folder, self._config.versions_dir, version)
            meta = {**metadata, "lora": {k: peft.get(k) for k in ("r", "lora_alpha", "target_modules")},
                    "source_path": str(folder)}
            return AdapterRecord(version, str(copy), self._engine.base_name, parent,
                                 "rejected" if rejected else "registered", utc_now(), "", meta)

        return await self._store.add_adapter(make)

    async def promote(self, version: int, expected_current: int | None = None, kind: str = "promote") -> int:
        """Serves `version` (0: the base) for new requests; returns the version it replaced."""
        async with self._lock:
            previous = self._promoted
            current = self.promoted_version
            if expected_current is not None and expected_current != current:
                raise Conflict(f"version {current} is serving, not {expected_current}; promotion not applied")
            if version == current:
                return current
            target = await self._loadable(version) if version else None
            if target:
                await self._engine.load_adapter(target, pin=True)  # preload before any request is routed
            await self._store.record_promotion(version, current, kind)
            self._promoted = target
            self._metrics.promoted_version.set(version)
            self._metrics.promotions.labels(kind).inc()
            log.info("%s: adapter version %s -> %s", kind, current or "base", version or "base")
        if previous:
            asyncio.get_running_loop().create_task(self._retire(previous.version))
        return current

    async def rollback(self, version: int | None) -> tuple[int, int]:
        """Promotes `version`, or by default the one that served before the current one."""
        current = self.promoted_version
        target = version if version is not None else await self._store.rollback_target(current)
        previous = await self.promote(target, kind="rollback")
        return previous, target

    async def _loadable(self, version: int) -> AdapterRef:
        record = await self._store.get_adapter(version)
        if record.status == "rejected":
            raise FailedPrecondition(f"adapter version {version} was rejected and is never served")
        return AdapterRef(version, record.path)

    async def _retire(self, version: int) -> None:
        """Frees the engine slot of a version once no request is running on it (unless it came back)."""
        async with self._drained:
            await self._drained.wait_for(lambda: not self._in_flight[version])
        if version != self.promoted_version and await self._engine.unload_adapter(version):
            log.info("retired adapter version %s from the engine", version)

