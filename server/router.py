"""Adapter router: which adapter version serves a request, registration of new versions,
promotion (preload, then flip) and retirement of the old one once its requests have drained."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime

from .adapters import check_lora, resolve_inside, sha256_of, stage
from .auth import Principal
from .config import ServerConfig
from .domain import BASE_VERSION, AdapterChoice
from .engine import AdapterRef, Engine
from .errors import Conflict, FailedPrecondition
from .metrics import Metrics
from .records import AdapterRecord, AdapterStatus
from .store import Store, utc_now

log = logging.getLogger(__name__)


class AdapterRouter:
    """Owns the 'promoted' alias. Promotion and rollback are compare-and-swaps under one lock."""

    def __init__(self, config: ServerConfig, engine: Engine, store: Store, metrics: Metrics) -> None:
        self._config, self._engine, self._store, self._metrics = config, engine, store, metrics
        self._promoted: AdapterRef | None = None  # None: the base model serves
        self._in_flight: Counter[int] = Counter()
        self._idle: dict[int, asyncio.Event] = {}  # set while no request runs on that version
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()     # retirements under way: kept, and their failures logged

    @property
    def promoted_version(self) -> int:
        return self._promoted.version if self._promoted else BASE_VERSION

    async def restore(self) -> None:
        """On start: serve again whatever was promoted when the server last ran. If it cannot be loaded, serve
        the base model and say so (log and metric) rather than crash-looping on it."""
        version = await self._store.promoted_version()
        promoted_at = None  # not recorded for the base model
        if version:
            try:
                promoted = await self._loadable(version)
                await self._engine.load_adapter(promoted, pin=True)
                self._promoted = promoted
                promoted_at = datetime.fromisoformat((await self._store.get_adapter(version)).promoted_at).timestamp()
            except (FailedPrecondition, OSError) as exc:
                log.error("promoted adapter version %d cannot be served (%s); serving the base model instead "
                          "until a version is promoted", version, exc)
                self._metrics.adapter_load_failures.labels("start").inc()
                self._metrics.promoted_unloadable.set(version)
        self._metrics.serving_changed(self.promoted_version, previous=None, promoted_at=promoted_at)
        log.info("serving adapter version %s", self.promoted_version or "base")

    async def route(self, choice: AdapterChoice) -> AdapterRef | None:
        """The adapter a new request runs on; None means the base model. A version other than the promoted one
        is loaded first, so that a version the engine cannot load fails this request only."""
        if choice.base:
            return None
        if choice.version is None:
            return self._promoted
        if self._promoted and choice.version == self._promoted.version:
            return self._promoted
        adapter = await self._loadable(choice.version)
        try:
            await self._engine.load_adapter(adapter, pin=False)
        except FailedPrecondition:
            self._metrics.adapter_load_failures.labels("request").inc()
            raise
        return adapter

    @contextlib.contextmanager
    def serving(self, adapter: AdapterRef | None) -> Iterator[None]:
        """Counts a request as in flight on `adapter`, so that it is not retired under it."""
        version = adapter.version if adapter else BASE_VERSION
        idle = self._idle.setdefault(version, asyncio.Event())
        self._in_flight[version] += 1
        idle.clear()
        try:
            yield
        finally:
            self._in_flight[version] -= 1
            if not self._in_flight[version]:
                idle.set()

    async def register(self, path: str, parent: int, metadata: dict, rejected: bool,
                       actor: Principal) -> AdapterRecord:
        """Copies the folder's adapter files aside (in a worker thread, never in the store's writer), then
        registers the copy as `register_staged` does."""
        folder = resolve_inside(path, self._config.adapter_dir)
        if parent:
            await self._store.get_adapter(parent)  # NotFound for an unknown parent
        staged = await asyncio.to_thread(stage, folder, self._config.versions_dir, self._config.max_adapter_bytes)
        return await self.register_staged(staged, parent, {**metadata, "source_path": str(folder)}, rejected, actor)

    async def register_staged(self, staged, parent: int, metadata: dict, rejected: bool,
                              actor: Principal) -> AdapterRecord:
        """Validates a staged copy (our checks, then vLLM's own loader) and records it as the next version;
        whatever happens, the staging folder is gone afterwards (renamed into place, or removed)."""
        try:
            if parent:
                await self._store.get_adapter(parent)
            peft = await asyncio.to_thread(check_lora, staged, self._engine.base_config, self._engine.base_name,
                                           self._config.max_lora_rank)
            await self._engine.check_adapter(staged)
            digest = await asyncio.to_thread(sha256_of, staged)
            status = AdapterStatus.REJECTED if rejected else AdapterStatus.REGISTERED
            meta = {**metadata, "lora": {k: peft.get(k) for k in ("r", "lora_alpha", "target_modules")}}

            def make(version: int, copy) -> AdapterRecord:
                return AdapterRecord(version, str(copy), self._engine.base_name, parent, status, utc_now(), "", meta,
                                     actor.key_id, actor.app_id, digest)

            record = await self._store.add_adapter(staged, self._config.versions_dir, make, actor)
        finally:
            await asyncio.to_thread(shutil.rmtree, staged, True)  # gone already when registered (renamed)
        if not rejected:
            self._metrics.candidate_registered(record.version)
        return record

    async def promote(self, version: int, expected_current: int | None, actor: Principal) -> int:
        """Serves `version` (0: the base) for new requests; returns the version it replaced."""
        return await self._swap(lambda current: _constant(version), expected_current, "promote", actor)

    async def rollback(self, version: int | None, expected_current: int | None, actor: Principal) -> tuple[int, int]:
        """Promotes `version`, or by default the one that served before the current one; the target is chosen
        under the same lock as the swap, so a promotion in between cannot be silently undone."""
        target = (lambda current: _constant(version)) if version is not None else self._store.rollback_target
        previous = await self._swap(target, expected_current, "rollback", actor)
        return previous, self.promoted_version

    async def _swap(self, choose: Callable[[int], Awaitable[int]], expected: int | None, kind: str,
                    actor: Principal) -> int:
        async with self._lock:
            previous, current = self._promoted, self.promoted_version
            if expected is not None and expected != current:
                raise Conflict(f"version {current} is serving, not {expected}; {kind} not applied")
            version = await choose(current)
            if version == current:
                return current
            target = await self._loadable(version) if version else None
            if target:
                await self._engine.load_adapter(target, pin=True)  # preload before any request is routed
            await self._store.record_promotion(version, current, kind, actor)
            self._promoted = target
            self._metrics.serving_changed(version, previous=current, promoted_at=time.time())
            self._metrics.promoted_unloadable.set(0)
            self._metrics.promotions.labels(kind).inc()
            log.info("%s: adapter version %s -> %s", kind, current or "base", version or "base")
        if previous:
            task = asyncio.get_running_loop().create_task(self._retire(previous.version))
            self._tasks.add(task)
            task.add_done_callback(self._retired)
        return current

    async def _loadable(self, version: int) -> AdapterRef:
        record = await self._store.get_adapter(version)
        if record.status is AdapterStatus.REJECTED:
            raise FailedPrecondition(f"adapter version {version} was rejected and is never served")
        return AdapterRef(version, record.path)

    async def _retire(self, version: int) -> None:
        """Frees the engine slot of a version once no request is running on it (unless it came back)."""
        while self._in_flight[version]:
            await self._idle[version].wait()
        if version != self.promoted_version and await self._engine.unload_adapter(version):
            log.info("retired adapter version %s from the engine", version)

    def _retired(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("retiring an adapter version failed", exc_info=task.exception())


async def _constant(version: int) -> int:
    return version
