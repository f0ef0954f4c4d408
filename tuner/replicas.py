"""The servers a tuner works for, reached through their API only: it reads every replica's ratings, uploads each
candidate to every replica, promotes on each by compare-and-swap, records its runs on each, and brings back in
step a replica that missed a promotion (the first target's serving adapter, by checksum, is what all should serve).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from instructd.client import ApiError
from instructd.client.tuning import TuningClient
from instructd.v1 import instructd_pb2 as pb

from .config import TunerConfig

log = logging.getLogger("instructd.tuner")
PROGRESS_EVERY = 2.0  # seconds between progress reports, at most


@dataclass
class Feedback:
    """Ratings gathered from every replica."""

    new: list[pb.RatedExchange] = field(default_factory=list)
    old: list[pb.RatedExchange] = field(default_factory=list)
    cursors: dict[str, int] = field(default_factory=dict)  # per target: the newest cursor read


class Replicas:
    def __init__(self, config: TunerConfig) -> None:
        self.config = config
        self.clients = {target: TuningClient(target) for target in config.targets}
        self.primary = self.clients[config.primary]

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def recover(self) -> None:
        """After a crash: runs left running are failed and their candidates rejected, on every replica."""
        for target, client in self.clients.items():
            failed, rejected = client.recover_runs()
            if failed:
                log.warning("%s: runs %s were interrupted; rejected their candidates %s", target, failed, rejected)
        for partial in self.config.work_dir.glob("candidates/.run-*.partial"):
            shutil.rmtree(partial, ignore_errors=True)

    def requested(self) -> bool:
        """Claims `tune --now` requests made on any replica."""
        return any([client.claim_request() for client in self.clients.values()])

    def new_ratings(self) -> int:
        return sum(client.tuning_status(limit=1).new_ratings for client in self.clients.values())

    def feedback(self) -> Feedback:
        """From each replica: ratings since its last judged run (new), and older held-out ones (the gate's history;
        with include_older, older trainable ones too)."""
        gathered = Feedback()
        for target, client in self.clients.items():
            since = client.tuning_status(limit=1).learnt_until
            new = list(client.export(after=since))
            gathered.new += new
            gathered.cursors[target] = max((r.cursor for r in new), default=since)
            if since:
                held = pb.HELD_OUT_ALL if self.config.include_older else pb.HELD_OUT_ONLY
                gathered.old += client.export(until=since, held_out=held)
        return gathered

    def serving(self) -> tuple[int, pb.Adapter | None]:
        """The primary's serving version and its record (None: the base model)."""
        adapters, current = self.primary.adapters()
        return current, next((a for a in adapters if a.version == current), None)

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
        return Run({target: client.start_run(trigger).id for target, client in self.clients.items()}, self)

    def upload(self, folder: Path, parent_sha256: str, metadata: dict) -> dict[str, pb.Adapter]:
        """Registers the candidate on every replica (each numbers its versions itself), with its parent there."""
        candidates = {}
        for target, client in self.clients.items():
            parent = _version_with(client, parent_sha256)
            candidates[target] = client.upload_adapter(folder, parent_version=parent, metadata=metadata)
        return candidates

    def judged(self, candidates: dict, verdict: pb.Verdict) -> None:
        for target, client in self.clients.items():
            client.record_evaluation(candidates[target].version, verdict)

    def promote(self, candidates: dict, expected: dict[str, int]) -> list[str]:
        """Promotes each replica's copy of the candidate, by compare-and-swap against what served there when the run
        began; returns what failed, one line per replica (each is retried by catch_up)."""
        failures = []
        for target, client in self.clients.items():
            try:
                client.promote(candidates[target].version, expected_current=expected[target])
            except ApiError as error:
                failures.append(f"{target}: {error}")
        return failures

    def current(self) -> dict[str, int]:
        return {target: client.adapters()[1] for target, client in self.clients.items()}

    def catch_up(self) -> list[str]:
        """Brings every replica to the adapter the primary serves (by checksum): uploads it where it is missing and
        promotes it. Returns a line per replica it could not bring in step (it tries again next time)."""
        version, record = self.serving()
        behind = []
        for target, client in list(self.clients.items())[1:]:
            try:
                adapters, current = client.adapters()
                serving = next((a for a in adapters if a.version == current), None)
                if (serving.sha256 if serving else "") == (record.sha256 if record else ""):
                    continue
                mine = _version_with(client, record.sha256) if record else 0
                if record and not mine:
                    mine = client.upload_adapter(self.local_copy(version, record.sha256),
                                                 metadata=record.metadata).version
                client.promote(mine, expected_current=current)
                log.info("%s caught up: serving v%d, as the primary serves v%d", target, mine, version)
            except ApiError as error:
                behind.append(f"{target}: {error}")
        return behind


def _version_with(client: TuningClient, sha256: str) -> int:
    """The version of `client`'s server whose weights have this checksum (0: none, or the base model)."""
    if not sha256:
        return 0
    adapters, _ = client.adapters()
    return next((a.version for a in adapters if a.sha256 == sha256 and a.status != "rejected"), 0)


class Run:
    """One tuning run, recorded on every replica as it goes."""

    def __init__(self, ids: dict[str, int], replicas: Replicas) -> None:
        self.ids, self._replicas, self._reported = ids, replicas, 0.0

    @property
    def id(self) -> int:
        return self.ids[self._replicas.config.primary]

    def update(self, **fields) -> None:
        for target, client in self._replicas.clients.items():
            client.update_run(self.ids[target], **fields)

    def progress(self, step: int, total: int, loss: float) -> None:
        """Training progress, at most every PROGRESS_EVERY seconds (and always the last step)."""
        if step < total and time.monotonic() - self._reported < PROGRESS_EVERY:
            return
        self._reported = time.monotonic()
        self.update(step=step, total_steps=total, loss=loss)

    def finish(self, outcome: str, cursors: dict[str, int] | None = None, **fields) -> None:
        """Ends the run on every replica; a judged run (cursors given) records how far it read each one."""
        for target, client in self._replicas.clients.items():
            extra = {"data_until": cursors[target]} if cursors else {}
            try:
                client.update_run(self.ids[target], outcome=outcome, **fields, **extra)
            except ApiError as error:
                log.error("could not record the end of run %d on %s: %s", self.ids[target], target, error)
