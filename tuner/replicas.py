"""The servers a tuner works for, reached through their API only: it reads every replica's ratings, uploads each
candidate to every replica, promotes on each by compare-and-swap, records its runs on each, and brings back in
step a replica that missed a promotion (what the first target serves, by checksum, is what all should serve).

The first target is required; another that does not answer is reported (logged, and named in the run) and left
out of what follows, and catch_up brings it in step once it answers again.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructd.client import ApiError
from instructd.client.types import Promotion
from instructd.client.tuning import TuningClient
from instructd.v1 import instructd_pb2 as pb

from .config import TunerConfig

log = logging.getLogger("instructd.tuner")
PROGRESS_EVERY = 2.0  # seconds between progress reports, at most


@dataclass
class Feedback:
    """Ratings gathered from every replica that answered."""

    new: list[pb.RatedExchange] = field(default_factory=list)
    old: list[pb.RatedExchange] = field(default_factory=list)
    cursors: dict[str, int] = field(default_factory=dict)  # per target: the newest cursor read


class Replicas:
    def __init__(self, config: TunerConfig) -> None:
        self.config = config
        self.clients = {target: TuningClient(target) for target in config.targets}
        self.primary = self.clients[config.primary]
        self.away: dict[str, str] = {}  # target -> why it did not answer, for the run's report

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def each(self, call: Callable[[str, TuningClient], Any], among: dict | None = None) -> dict[str, Any]:
        """call(target, client) on every replica (or those in `among`): {target: result} of those that answered.
        The first target's failure is raised; another's is noted in `away` and logged."""
        results = {}
        for target, client in self.clients.items():
            if among is not None and target not in among:
                continue
            try:
                results[target] = call(target, client)
            except ApiError as error:
                if target == self.config.primary:
                    raise
                self.away[target] = str(error)
                log.warning("replica %s did not answer: %s", target, error)
        return results

    def recover(self) -> None:
        """After a crash: runs left running are failed and their candidates rejected, on every replica."""
        for target, (failed, rejected) in self.each(lambda t, c: c.recover_runs()).items():
            if failed:
                log.warning("%s: runs %s were interrupted; rejected their candidates %s", target, failed, rejected)
        for partial in self.config.work_dir.glob("candidates/.run-*.partial"):
            shutil.rmtree(partial, ignore_errors=True)

    def requested(self) -> bool:
        """Claims `tune --now` requests made on any replica."""
        return any(self.each(lambda t, c: c.claim_request()).values())

    def canary_running(self) -> bool:
        """Whether the primary is running a canary."""
        return self.primary.tuning_status(limit=1).canary is not None

    def new_ratings(self) -> int:
        return sum(self.each(lambda t, c: c.tuning_status(limit=1).new_ratings).values())

    def feedback(self) -> Feedback:
        """From each replica: ratings since its last judged run (new), and older held-out ones (the gate's history),
        with older trainable ones too when a candidate starts from the base (it relearns them) or with include_older."""
        older = self.config.include_older or self.config.start_from == "base"
        held = pb.HELD_OUT_ALL if older else pb.HELD_OUT_ONLY

        def read(target: str, client: TuningClient) -> tuple[list, list, int]:
            since = client.tuning_status(limit=1).learnt_until
            new = list(client.export(after=since))
            old = list(client.export(until=since, held_out=held)) if since else []
            return new, old, max((r.cursor for r in new), default=since)

        gathered = Feedback()
        for target, (new, old, cursor) in self.each(read).items():
            gathered.new += new
            gathered.old += old
            gathered.cursors[target] = cursor
        return gathered

    def serving(self) -> tuple[int, pb.Adapter | None]:
        """The primary's serving version and its record (None: the base model)."""
        adapters, current = self.primary.adapters()
        return current, next((a for a in adapters if a.version == current), None)

    def learnt(self, version: int) -> frozenset[str] | None:
        """The exchanges the primary's `version` learnt from: those it was trained on, and its ancestors' up to one
        trained from the base (a version trained from its parent's weights learnt what the parent learnt). None when
        one of them was registered by hand: it learnt from no ratings we have, so its weights cannot be retrained."""
        adapters = {a.version: a for a in self.primary.adapters()[0]}
        ids: set[str] = set()
        while version:  # a parent is registered before its child: versions fall to 0, the base
            metadata = adapters[version].metadata
            if "exchange_ids" not in metadata:
                return None
            ids.update(metadata["exchange_ids"])
            version = 0 if metadata.get("weights_from") == "base" else adapters[version].parent_version
        return frozenset(ids)

    def local_copy(self, version: int, sha256: str) -> Path:
        """The primary's `version` in the tuner's own directory, downloaded once (by checksum)."""
        folder = self.config.work_dir / "versions" / sha256
        if not (folder / "adapter_model.safetensors").is_file():
            partial = folder.with_name(f".{sha256}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            self.primary.download_adapter(version, partial)
            partial.rename(folder)
        return folder

    def start_run(self, trigger: str) -> Run:
        self.away.clear()
        return Run(self.each(lambda t, c: c.start_run(trigger).id), self)

    def current(self, among: dict) -> dict[str, int]:
        return self.each(lambda t, c: c.adapters()[1], among)

    def upload(self, folder: Path, parent_sha256: str, metadata: dict, among: dict) -> dict[str, pb.Adapter]:
        """Registers the candidate on each replica (each numbers its versions itself), with its parent there."""
        return self.each(lambda t, c: c.upload_adapter(folder, parent_version=_version_with(c, parent_sha256),
                                                       metadata=metadata), among)

    def judged(self, candidates: dict, verdict: pb.Verdict) -> None:
        self.each(lambda t, c: c.record_evaluation(candidates[t].version, verdict), candidates)

    def promote(self, candidates: dict, expected: dict[str, int]) -> Promotion:
        """Releases each replica's copy of the candidate, by compare-and-swap against what served there when the run
        began: promoted, or first served to a share of users where the server runs a canary (each replica judges its
        own; catch_up then brings the others to what the primary serves). A replica that fails is in `away` (and
        catch_up retries it). Returns the primary's outcome."""
        released = self.each(lambda t, c: c.promote(candidates[t].version, expected_current=expected[t], canary=True),
                             candidates)
        return released[self.config.primary]

    def catch_up(self) -> None:
        """Brings every replica to the adapter the primary serves (by checksum): uploads it where it is missing and
        promotes it. One that does not answer is logged, and tried again next time."""
        version, record = self.serving()

        def step(target: str, client: TuningClient) -> None:
            adapters, current = client.adapters()
            serving = next((a for a in adapters if a.version == current), None)
            if (serving.sha256 if serving else "") == (record.sha256 if record else ""):
                return
            mine = _version_with(client, record.sha256) if record else 0
            if record and not mine:
                mine = client.upload_adapter(self.local_copy(version, record.sha256), metadata=record.metadata).version
            client.promote(mine, expected_current=current)
            log.info("%s caught up: serving v%d, as the first target serves v%d", target, mine, version)

        self.each(step, {t: None for t in list(self.clients)[1:]})


def _version_with(client: TuningClient, sha256: str) -> int:
    """The version of `client`'s server whose weights have this checksum (0: none, or the base model)."""
    if not sha256:
        return 0
    adapters, _ = client.adapters()
    return next((a.version for a in adapters if a.sha256 == sha256 and a.status != "rejected"), 0)


class Run:
    """One tuning run, recorded on every replica that answered when it started."""

    def __init__(self, ids: dict[str, int], replicas: Replicas) -> None:
        self.ids, self._replicas, self._reported = ids, replicas, 0.0

    @property
    def id(self) -> int:
        return self.ids[self._replicas.config.primary]

    def update(self, **fields) -> None:
        self._replicas.each(lambda t, c: c.update_run(self.ids[t], **fields), self.ids)

    def progress(self, step: int, total: int, loss: float) -> None:
        """Training progress, at most every PROGRESS_EVERY seconds (and always the last step)."""
        if step < total and time.monotonic() - self._reported < PROGRESS_EVERY:
            return
        self._reported = time.monotonic()
        self.update(step=step, total_steps=total, loss=loss)

    def finish(self, outcome: str, reason: str, cursors: dict[str, int] | None = None, **fields) -> None:
        """Ends the run on every replica, naming the replicas that did not answer; a judged run (cursors given)
        records how far it read each one."""
        if self._replicas.away:
            reason += "; replicas that did not answer (caught up when they do): " + "; ".join(
                f"{t}: {why}" for t, why in self._replicas.away.items())

        def end(target: str, client: TuningClient) -> None:
            extra = {"data_until": cursors[target]} if cursors and target in cursors else {}
            client.update_run(self.ids[target], outcome=outcome, reason=reason[:4000], **fields, **extra)

        self._replicas.each(end, self.ids)
