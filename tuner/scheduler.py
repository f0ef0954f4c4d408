"""The tuner process: one run at a time, started by a request (`instructd tune --now` on any replica), by enough
new ratings, or by a timer; between runs it keeps every replica serving what the first one serves. Training
happens here, never in a server process, and here may be any machine: servers are reached by their API only."""

from __future__ import annotations

import fcntl
import logging
import time

from instructd.client import ApiError

from .config import TunerConfig
from .cycle import CycleResult, run_cycle
from .replicas import Replicas

log = logging.getLogger("instructd.tuner")


def run_tuner(config: TunerConfig, once: bool = False, classifier: str = "") -> None:
    """Runs until killed (or, with once, a single run now). A second tuner on the same work directory exits."""
    config.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = open(config.work_dir / "tuner.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another tuner is running in {config.work_dir}") from None
    replicas = Replicas(config)
    try:
        replicas.recover()
        if once:
            run_cycle(config, replicas, "requested", classifier)
            return
        log.info("tuner working for %s: a run every %d new ratings%s, or on `instructd tune --now`",
                 ", ".join(config.targets), config.min_new_ratings,
                 f" or every {config.period_seconds:g}s" if config.period_seconds else "")
        last_run, last = time.monotonic(), CycleResult("")
        waiting_past = 0  # ratings the last run kept but found too few: the next waits for more than these
        while True:
            try:
                replicas.catch_up()
                new = replicas.new_ratings()
                trigger = _due(config, replicas.requested(), new - waiting_past, time.monotonic() - last_run,
                               last.outcome, replicas.canary_running())
                if trigger:
                    last = run_cycle(config, replicas, trigger, classifier)
                    last_run = time.monotonic()
                    waiting_past = new if last.wants_more_ratings else 0
            except ApiError as error:  # the first target is away: say so, and try again at the next poll
                log.warning("could not reach %s: %s", config.primary, error)
            time.sleep(config.poll_seconds)  # polling other processes' state: nothing here to await
    finally:
        replicas.close()


def _due(config: TunerConfig, requested: bool, new: int, since_last_run: float, last_outcome: str,
         canary: bool = False) -> str | None:
    """What starts a run now, if anything: a request; else `new` ratings (beyond those the last run kept and judged
    too few) reaching the threshold, or the timer with at least one. A failed run is retried only after a pause, and
    none starts by itself while a canary runs: its live ratings decide first (a new candidate would end it)."""
    if requested:
        return "requested"
    if canary:
        return None
    if last_outcome == "failed" and since_last_run < config.retry_seconds:
        return None  # the same data would fail again at once
    if new >= config.min_new_ratings:
        return "threshold"
    if config.period_seconds and new > 0 and since_last_run >= config.period_seconds:
        return "period"
    return None
