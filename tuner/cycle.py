"""One tuning run, top to bottom: select data, train a candidate from the serving adapter, register it,
judge it at the gate, then promote it (compare-and-swap) or reject it."""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from instructd.client import Client

from .config import TunerConfig
from .dataset import build_dataset, load_classifier
from .evaluate import judge
from .runs import RunLog
from .train import train_adapter

log = logging.getLogger("instructd.tuner")


def run_cycle(config: TunerConfig, runs: RunLog, client: Client, trigger: str, classifier: str = "") -> str:
    """Runs one cycle and returns its outcome: promoted, rejected, skipped or failed."""
    run_id = runs.start(trigger)
    detail: dict = {"trigger": trigger}
    try:
        since = runs.last_data_until()
        data = build_dataset(config, since, load_classifier(classifier))
        detail.update(since=since, data=data.summary())
        usable = [e for e in data.train if e.desirable or config.objective == "kto"]
        if not usable or not data.held_out:
            detail["reason"] = "not enough new feedback: need training examples and a held-out slice"
            runs.finish(run_id, "skipped", detail)
            log.info("run %d skipped: %s", run_id, detail["data"])
            return "skipped"

        adapters, current = client.adapters()
        parent = next((Path(a.path) for a in adapters if a.version == current), None)
        partial, out = config.adapter_dir / f".run-{run_id}.partial", config.adapter_dir / f"run-{run_id}"
        lineage = {"run_id": run_id, "base_model": config.model.name, "parent_version": current}
        result = train_adapter(config, data.train, partial, parent, metadata=lineage,
                               progress=lambda step, total, loss: runs.progress(run_id, step, total, loss))
        partial.rename(out)
        detail["train"] = asdict(result)

        candidate = client.register(str(out), parent_version=current, metadata={
            **lineage, "hyperparameters": config.hyperparameters(), "data": data.summary(),
            "exchange_ids": data.exchange_ids, "train": asdict(result)})
        runs.set_candidate(run_id, candidate.version)
        verdict = judge(config, (candidate.version, out), (current, parent), data.held_out, data.history)
        detail["verdict"] = verdict.scores()
        client.record_evaluation(candidate.version, verdict.scores(), verdict.passed)
        if verdict.passed:
            client.promote(candidate.version, expected_current=current)
        outcome = "promoted" if verdict.passed else "rejected"
        runs.finish(run_id, outcome, detail, examples=result.examples, loss=result.final_loss,
                    data_until=data.data_until)
        log.info("run %d: candidate v%d %s (%s)", run_id, candidate.version, outcome, verdict.reason)
        return outcome
    except Exception as exc:
        log.exception("tuning run %d failed", run_id)
        detail["error"] = f"{type(exc).__name__}: {exc}"
        runs.finish(run_id, "failed", detail)
        return "failed"


def recover(config: TunerConfig, runs: RunLog, client: Client) -> None:
    """After a crash: fail interrupted runs, reject any candidate they registered, drop partial folders."""
    interrupted = set(runs.mark_interrupted())
    if interrupted:
        adapters, _ = client.adapters()
        for a in adapters:
            if a.status == "registered" and a.metadata.get("run_id") in interrupted:
                client.record_evaluation(a.version, {"reason": "its tuning run was interrupted"}, passed=False)
                log.warning("rejected v%d: its tuning run was interrupted", a.version)
    for partial in config.adapter_dir.glob(".run-*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
