"""One tuning run, top to bottom: gather ratings from every replica, train a candidate from the base (on all the
feedback the serving version learnt and the new, and on the base's own answers to rehearsal prompts), upload it to
every replica, judge it against the serving version at the gate, then promote it everywhere (compare-and-swap) or
reject it."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from .config import TunerConfig
from .dataset import build_dataset, for_objective, load_classifier
from .evaluate import Version, judge, keeps_ratings
from .rehearsal import rehearsal_examples, with_rehearsal
from .replicas import Replicas
from .train import train_adapter

log = logging.getLogger("instructd.tuner")


@dataclass(frozen=True)
class CycleResult:
    outcome: str
    """promoted, rejected, skipped or failed."""
    wants_more_ratings: bool = False
    """It kept the ratings it read but found them too few to learn from or to judge by (it was skipped, or rejected
    for a reason that is not theirs): the next run waits for more, then trains and judges on all of them."""


def run_cycle(config: TunerConfig, replicas: Replicas, trigger: str, classifier: str = "") -> CycleResult:
    """Runs one cycle. A judged run whose ratings are used up records how far it read (the next run starts after);
    one that keeps them does not, so the next run trains and judges on them again, with whatever arrived since."""
    run = replicas.start_run(trigger)
    try:
        gathered = replicas.feedback()
        current, serving = replicas.serving()
        learnt = replicas.learnt(current) if config.start_from == "base" else None  # None: continue serving's weights
        from_base, learnt = learnt is not None or serving is None, learnt or frozenset()
        data = build_dataset(config, gathered.new, gathered.old, load_classifier(classifier), learnt)
        run.update(data=data.summary())
        usable = [e for e in for_objective(data.train, config.objective) if e.exchange_id not in learnt]
        if not usable or not data.held_out:
            reason = (f"not enough new feedback: {len(usable)} usable new training examples and {len(data.held_out)} "
                      f"held out (both are needed); dropped: {dict(data.dropped) or 'none'}")
            run.finish("skipped", reason)
            log.info("run %d skipped: %s", run.id, reason)
            return CycleResult("skipped", wants_more_ratings=True)

        expected = replicas.current(run.ids)  # what serves where as the run begins: each promotion is a CAS
        parent = replicas.local_copy(current, serving.sha256) if serving else None
        candidates_dir = config.work_dir / "candidates"
        candidates_dir.mkdir(parents=True, exist_ok=True)
        partial, out = candidates_dir / f".run-{run.id}.partial", candidates_dir / f"run-{run.id}"
        rehearsal = rehearsal_examples(config)
        lineage = {"run_id": run.id, "base_model": config.model.name, "parent_sha256": serving.sha256 if serving else "",
                   "rehearsal": len(rehearsal), "weights_from": "base" if from_base else "parent"}
        result = train_adapter(config, with_rehearsal(config, data.train, rehearsal), partial, None if from_base else parent,
                               metadata=lineage, progress=run.progress)
        partial.rename(out)

        candidates = replicas.upload(out, serving.sha256 if serving else "", {
            **lineage, "hyperparameters": config.hyperparameters(), "exchange_ids": data.exchange_ids,
            "train": asdict(result)}, expected)
        run.update(candidate_version=candidates[config.primary].version, examples=result.examples,
                   loss=result.final_loss)
        candidate = candidates[config.primary]
        verdict = judge(config, Version(candidate.version, out, candidate.sha256),
                        Version(current, parent, serving.sha256 if serving else ""), data.held_out, data.history,
                        retrains_current=from_base)
        replicas.judged(candidates, verdict)
        outcome, kept = "promoted" if verdict.passed else "rejected", keeps_ratings(verdict)
        reason = verdict.reason + ("; its ratings stay for the next run" if kept else "")
        if verdict.passed:  # a replica that fails is named in the run, and caught up later
            if canary := replicas.promote(candidates, expected).canary:
                reason += f"; serving a canary to {canary.share:.0%} of users, whose ratings decide"
        run.finish(outcome, reason, None if kept else gathered.cursors, verdict=verdict)
        log.info("run %d: candidate v%d %s (%s)", run.id, candidates[config.primary].version, outcome, reason)
        return CycleResult(outcome, kept)
    except Exception as exc:
        log.exception("tuning run %d failed", run.id)
        run.finish("failed", f"{type(exc).__name__}: {exc}"[:2000])
        return CycleResult("failed")  # its ratings stay too; tried again after a pause
