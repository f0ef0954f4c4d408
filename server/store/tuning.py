"""Tuning runs as tuners report them through the API, and operators' requests for a run."""

from __future__ import annotations

from dataclasses import dataclass

import sqlite_utils

from instructd.v1 import instructd_pb2 as pb

from ..auth import Principal
from ..domain import Audit
from ..errors import FailedPrecondition, NotFound
from ..records import JUDGED, AdapterStatus, RunOutcome, RunRecord, RunTrigger, message_to_json
from .base import StoreBase, audit
from .schema import utc_now

INTERRUPTED = "interrupted: the tuner stopped during this run"


@dataclass
class TuningSummary:
    """What /metrics shows of tuning."""

    counts: dict[RunOutcome, int]
    new_ratings: int
    failed_in_a_row: int
    last: RunRecord | None  # the last run that finished and was not skipped


@dataclass
class TuningState:
    runs: list[RunRecord]
    requested: bool
    newest_cursor: int
    learnt_until: int


def _cursors(db: sqlite_utils.Database) -> tuple[int, int]:
    """The newest export cursor, and the one up to which judged runs learnt."""
    newest = db.execute("SELECT COALESCE(MAX(seq), 0) FROM feedback").fetchone()[0]
    judged = ",".join(f"'{o.stored}'" for o in JUDGED)
    learnt = db.execute(f"SELECT COALESCE(MAX(cursor), 0) FROM tuning_runs WHERE status IN ({judged})").fetchone()[0]
    return newest, learnt


def _run(db: sqlite_utils.Database, run_id: int) -> RunRecord:
    rows = list(db["tuning_runs"].rows_where("id = ?", [run_id]))
    if not rows:
        raise NotFound(f"no tuning run {run_id}")
    return RunRecord.from_row(rows[0])


class TuningTables(StoreBase):
    async def request_tuning(self, actor: Principal) -> None:
        def write(db: sqlite_utils.Database) -> None:
            db["tuning_requests"].insert({"requested_at": utc_now(), "consumed_at": ""})
            audit(db, actor, Audit.TUNING_TRIGGERED, "")

        await self._write(write)

    async def claim_request(self) -> bool:
        """Consumes pending `tune --now` requests; True if there was one."""
        return await self._write(lambda db: db.execute(
            "UPDATE tuning_requests SET consumed_at = ? WHERE consumed_at = ''", [utc_now()]).rowcount > 0)


    def tuning_summary(self) -> TuningSummary:
        """For /metrics, in its own thread (a scrape)."""

        def read(db: sqlite_utils.Database) -> TuningSummary:
            counts = {RunOutcome.from_stored(s): n for s, n in
                      db.execute("SELECT status, COUNT(*) FROM tuning_runs GROUP BY status").fetchall()}
            newest, learnt = _cursors(db)
            judged = ",".join(f"'{o.stored}'" for o in JUDGED)
            failed = db.execute(f"""SELECT COUNT(*) FROM tuning_runs WHERE status = 'failed' AND id >
                (SELECT COALESCE(MAX(id), 0) FROM tuning_runs WHERE status IN ({judged}))""").fetchone()[0]
            last = list(db["tuning_runs"].rows_where("status NOT IN ('running', 'skipped')", order_by="id DESC",
                                                      limit=1))
            return TuningSummary(counts, newest - learnt, failed,
                                 RunRecord.from_row(last[0]) if last else None)

        return self.read_now(read)

    async def tuning_status(self, limit: int) -> TuningState:
        """The newest runs, whether a requested run has not started yet, and the export cursors."""

        def read(db: sqlite_utils.Database) -> TuningState:
            runs = [RunRecord.from_row(r) for r in db["tuning_runs"].rows_where(order_by="id DESC", limit=limit)]
            pending = db.execute("SELECT COUNT(*) FROM tuning_requests WHERE consumed_at = ''").fetchone()[0]
            return TuningState(runs, pending > 0, *_cursors(db))

        return await self._read(read)

    async def start_run(self, trigger: RunTrigger, actor: Principal) -> RunRecord:
        def write(db: sqlite_utils.Database) -> RunRecord:
            now = utc_now()
            table = db["tuning_runs"].insert({
                "status": RunOutcome.RUNNING.stored, "trigger": trigger.stored, "started_at": now, "updated_at": now,
                "finished_at": "", "metadata_json": "{}", "created_by_key": actor.key_id, "app_id": actor.app_id})
            return _run(db, table.last_pk)

        return await self._write(write)

    async def update_run(self, update: pb.UpdateRunRequest) -> RunRecord:
        """Sets what the update carries; an outcome other than running ends the run (once: an ended run stays)."""

        def write(db: sqlite_utils.Database) -> RunRecord:
            run = _run(db, update.id)
            if run.outcome is not RunOutcome.RUNNING:
                raise FailedPrecondition(f"tuning run {update.id} already ended ({run.outcome.stored})")
            fields = {name: getattr(update, name) for name in ("step", "total_steps", "loss", "examples",
                                                               "candidate_version") if update.HasField(name)}
            if update.HasField("data_until"):
                fields["cursor"] = update.data_until
            for name, message in (("data_json", update.data if update.HasField("data") else None),
                                  ("verdict_json", update.verdict if update.HasField("verdict") else None)):
                if message is not None:
                    fields[name] = message_to_json(message)
            if update.reason:
                fields["reason"] = update.reason
            if update.outcome not in (pb.RUN_OUTCOME_UNSPECIFIED, pb.RUN_RUNNING):
                fields |= {"status": RunOutcome(update.outcome).stored, "finished_at": utc_now()}
            db["tuning_runs"].update(update.id, {**fields, "updated_at": utc_now()})
            return _run(db, update.id)

        return await self._write(write)

    async def recover_runs(self, actor: Principal) -> tuple[list[int], list[int]]:
        """Fails the runs left running (their tuner stopped) and rejects any candidate they registered."""

        def write(db: sqlite_utils.Database) -> tuple[list[int], list[int]]:
            running = [r[0] for r in db.execute("SELECT id FROM tuning_runs WHERE status = ?",
                                                [RunOutcome.RUNNING.stored]).fetchall()]
            if not running:
                return [], []
            marks = ",".join("?" * len(running))
            db.execute(f"UPDATE tuning_runs SET status = ?, finished_at = ?, reason = ? WHERE id IN ({marks})",
                       [RunOutcome.FAILED.stored, utc_now(), INTERRUPTED, *running])
            orphans = [r[0] for r in db.execute(
                f"""SELECT version FROM adapters WHERE status = ? AND (json_extract(metadata_json, '$.run_id') IN
                    ({marks}) OR version IN (SELECT candidate_version FROM tuning_runs WHERE id IN ({marks})))""",
                [AdapterStatus.REGISTERED.stored, *running, *running]).fetchall()]
            verdict = message_to_json(pb.Verdict(passed=False, reason="its tuning run was interrupted"))
            for version in orphans:
                db["adapters"].update(version, {"status": AdapterStatus.REJECTED.stored, "verdict_json": verdict})
                audit(db, actor, Audit.EVALUATION_RECORDED, f"v{version} rejected")
            return running, orphans

        return await self._write(write)
