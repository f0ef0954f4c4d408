"""Adapter router: which adapter version serves a request, registration of new versions,
promotion (preload, then flip), the live canary, and retirement of a version once its requests have drained."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from .adapters import check_lora, resolve_inside, sha256_of, stage
from .auth import Principal, Role
from .canary import CanaryCall, CanaryMode, CanaryOutcome, CanaryRecord, CanaryRule, Tally, in_canary
from .config import ServerConfig
from .domain import BASE_VERSION, AdapterChoice
from .engine import AdapterRef, Engine
from .errors import Conflict, FailedPrecondition
from .metrics import Metrics
from .records import AdapterRecord, AdapterStatus
from .store import Store, utc_now

log = logging.getLogger(__name__)
SERVER = Principal("server", "", Role.ADMIN)  # the actor of what a canary's ratings decide, in the audit log
CANARY_CHECK_SECONDS = 1.0  # how often a running canary's ratings are counted and judged


@dataclass
class Canary:
    """The canary that runs: its record, the candidate's adapter, the users it answers and what their ratings say."""

    record: CanaryRecord
    adapter: AdapterRef
    users: set[str]
    tally: Tally = Tally()
    call: CanaryCall = CanaryCall.UNDECIDED
    p_no_worse: float = 0.0
    p_worse: float = 0.0


class AdapterRouter:
    """Owns the 'promoted' alias. Promotion and rollback are compare-and-swaps under one lock."""

    def __init__(self, config: ServerConfig, engine: Engine, store: Store, metrics: Metrics) -> None:
        self._config, self._engine, self._store, self._metrics = config, engine, store, metrics
        self._promoted: AdapterRef | None = None  # None: the base model serves
        self._in_flight: Counter[int] = Counter()
        self._idle: dict[int, asyncio.Event] = {}  # set while no request runs on that version
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()     # retirements under way: kept, and their failures logged
        self._canary: Canary | None = None
        self._rule = CanaryRule()

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
        if record := await self._store.active_canary():
            await self._resume_canary(record)
        self._keep(asyncio.get_running_loop().create_task(self._watch_canary()), "watching the canary")

    @property
    def canary(self) -> Canary | None:
        return self._canary

    @property
    def canary_mode(self) -> CanaryMode:
        return self._config.canary

    async def route(self, choice: AdapterChoice, who: str = "") -> AdapterRef | None:
        """The adapter a new request runs on; None means the base model. A running canary answers `who` (a user, or
        a request without one: `canary.audience`) if they fall in its share. A version other than the promoted one
        is loaded first, so that a version the engine cannot load fails this request only."""
        if choice.base:
            return None
        if choice.version is None:
            return self._canary.adapter if self._canary and self._in_canary(self._canary, who) else self._promoted
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

    async def start_canary(self, version: int, expected_current: int | None, actor: Principal) -> Canary | None:
        """Serves `version` to the canary share of users beside the promoted version, whose ratings then decide
        (see CanaryRule); with the canary mode off, promotes it at once and returns None."""
        if self._config.canary is CanaryMode.OFF:
            await self.promote(version, expected_current, actor)
            return None
        async with self._lock:
            current = self.promoted_version
            if expected_current is not None and expected_current != current:
                raise Conflict(f"version {current} is serving, not {expected_current}; canary not started")
            if version in (current, BASE_VERSION):
                raise FailedPrecondition(f"version {version} cannot be a canary: " + (
                    "it is serving" if version == current else "promote the base model directly"))
            adapter = await self._loadable(version)
            await self._engine.load_adapter(adapter, pin=True)
            ended = self._canary
            record = await self._store.start_canary(version, current, self._config.canary_share, actor)
            self._canary = Canary(record, adapter, set())
            self._metrics.canary_changed(self._canary, CanaryOutcome.ENDED if ended else None)
            log.info("canary: adapter version %s serves %.0f%% of users beside version %s", version,
                     100 * record.share, current or "base")
        if ended:
            self._retire_later(ended.adapter.version)
        return self._canary

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
            canary = self._canary
            if version == current and not canary:
                return current
            target = await self._loadable(version) if version and version != current else None
            if target:
                await self._engine.load_adapter(target, pin=True)  # preload before any request is routed
            if canary:  # a promotion or rollback ends the canary: approved when it promotes the canary's version
                outcome = CanaryOutcome.PROMOTED if canary.record.version == version else CanaryOutcome.ENDED
                await self._store.end_canary(outcome, actor)
                self._end_canary(outcome)
            if version != current:
                await self._store.record_promotion(version, current, kind, actor)
                self._promoted = target
                self._metrics.serving_changed(version, previous=current, promoted_at=time.time())
                self._metrics.promoted_unloadable.set(0)
                self._metrics.promotions.labels(kind).inc()
                log.info("%s: adapter version %s -> %s", kind, current or "base", version or "base")
        if previous and version != current:
            self._retire_later(previous.version)
        if canary and canary.record.version != version:
            self._retire_later(canary.record.version)
        return current

    async def _watch_canary(self) -> None:
        """Counts the running canary's ratings and acts on what they say, until the server stops."""
        while True:
            await asyncio.sleep(CANARY_CHECK_SECONDS)
            if canary := self._canary:
                try:
                    await self._judge_canary(canary)
                except Exception:
                    log.exception("judging the canary of version %d failed; trying again", canary.record.version)

    async def _judge_canary(self, canary: Canary) -> None:
        config, record = self._config, canary.record
        tally, users = await self._store.canary_tally(record)
        canary.users |= users
        canary.tally = tally
        canary.call, canary.p_no_worse, canary.p_worse = self._rule.call(tally)
        self._metrics.canary_changed(canary)
        elapsed = time.time() - datetime.fromisoformat(record.started_at).timestamp()
        at_limit = canary.call is CanaryCall.UNDECIDED and (  # a clear call in manual mode waits for the operator
            tally.candidate >= config.canary_max_ratings or elapsed >= config.canary_max_seconds)
        if canary.call is CanaryCall.WORSE:
            log.warning("canary: version %d is clearly worse than version %d (👍 %d/%d against %d/%d, P(worse) "
                        "%.3f); rolling it back", record.version, record.incumbent, tally.candidate_up,
                        tally.candidate, tally.incumbent_up, tally.incumbent, canary.p_worse)
            await self._stop_canary(canary, CanaryOutcome.ROLLED_BACK)
        elif canary.call is CanaryCall.NO_WORSE and config.canary is CanaryMode.AUTO:
            log.info("canary: version %d is no worse than version %d (👍 %d/%d against %d/%d, P(no worse) %.3f); "
                     "promoting it", record.version, record.incumbent, tally.candidate_up, tally.candidate,
                     tally.incumbent_up, tally.incumbent, canary.p_no_worse)
            await self._promote_canary(canary)
        elif at_limit and config.canary_promote_at_limit:
            log.info("canary: version %d reached its limit without a clear call; promoting it as configured",
                     record.version)
            await self._promote_canary(canary)
        elif at_limit:
            log.info("canary: version %d reached its limit without a clear call; version %s stays", record.version,
                     record.incumbent or "base")
            await self._stop_canary(canary, CanaryOutcome.EXPIRED)

    async def _promote_canary(self, canary: Canary) -> None:
        async def still_running(current: int) -> int:  # checked under the swap's lock
            if self._canary is not canary:
                raise Conflict("the canary ended meanwhile")
            return canary.record.version

        try:
            await self._swap(still_running, canary.record.incumbent, "promote", SERVER)
        except Conflict:  # an operator promoted, rolled back or started a canary in between: that ended this one
            pass

    async def _stop_canary(self, canary: Canary, outcome: CanaryOutcome) -> None:
        async with self._lock:
            if self._canary is not canary:
                return
            await self._store.end_canary(outcome, SERVER)
            self._end_canary(outcome)
        self._retire_later(canary.record.version)

    async def _resume_canary(self, record: CanaryRecord) -> None:
        """On start: the canary that ran when the server stopped goes on, with the same users."""
        try:
            adapter = await self._loadable(record.version)
            await self._engine.load_adapter(adapter, pin=True)
        except (FailedPrecondition, OSError) as exc:
            log.error("the canary's adapter version %d cannot be served (%s); ending the canary", record.version, exc)
            await self._store.end_canary(CanaryOutcome.ENDED, SERVER)
            return
        self._canary = Canary(record, adapter, (await self._store.canary_tally(record))[1])
        self._metrics.canary_changed(self._canary)
        log.info("canary: adapter version %d goes on serving %.0f%% of users", record.version, 100 * record.share)

    def _end_canary(self, outcome: CanaryOutcome) -> None:
        self._canary = None
        self._metrics.canary_changed(None, outcome)

    def _in_canary(self, canary: Canary, who: str) -> bool:
        """Whether this user gets the candidate: in its share by hash, and among the first canary_max_users."""
        if who in canary.users:
            return True
        if len(canary.users) < self._config.canary_max_users and in_canary(who, canary.record.version,
                                                                           canary.record.share):
            canary.users.add(who)
            return True
        return False

    def _retire_later(self, version: int) -> None:
        self._keep(asyncio.get_running_loop().create_task(self._retire(version)), "retiring an adapter version")

    def _keep(self, task: asyncio.Task, what: str) -> None:
        """Keeps a background task (so it is not collected mid-run) and logs its failure."""
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, what))

    def _done(self, task: asyncio.Task, what: str) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", what, exc_info=task.exception())

    async def _loadable(self, version: int) -> AdapterRef:
        record = await self._store.get_adapter(version)
        if record.status is AdapterStatus.REJECTED:
            raise FailedPrecondition(f"adapter version {version} was rejected and is never served")
        return AdapterRef(version, record.path)

    async def _retire(self, version: int) -> None:
        """Frees the engine slot of a version once no request is running on it (unless it came back)."""
        while self._in_flight[version]:
            await self._idle[version].wait()
        serving = {self.promoted_version, self._canary.record.version if self._canary else None}
        if version not in serving and await self._engine.unload_adapter(version):
            log.info("retired adapter version %s from the engine", version)


async def _constant(version: int) -> int:
    return version
