"""The tuner process: one run at a time, started by a request (`instructd tune --now`), by enough new
ratings, or by a timer. Training happens here, never in the server process."""

from __future__ import annotations

import fcntl
import logging
import time

from instructd.client import Client

from .config import TunerConfig
from .cycle import recover, run_cycle
from .runs import RunLog

log = logging.getLogger("instructd.tuner")


def run_tuner(config: TunerConfig, once: bool = False, classifier: str = "") -> None:
    """Runs until killed (or, with once, a single run now). A second tuner on the same data exits."""
    config.adapter_dir.mkdir(parents=True, exist_ok=True)
    lock = open(config.data_dir / "tuner.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another tuner is running on {config.data_dir}") from None
    runs = RunLog(config.db_path)
    with Client(config.target) as client:
        recover(config, runs, client)
        if once:
            run_cycle(config, runs, client, "requested", classifier)
            return
        log.info("tuner watching %s: a run every %d new ratings%s, or on `instructd tune --now`",
                 config.db_path, config.min_new_ratings,
                 f" or every {config.period_seconds:g}s" if config.period_seconds else "")
        last_run, last_outcome = time.monotonic(), ""
        while True:
            trigger = _due(config, runs, time.monotonic() - last_run, last_outcome)
            if trigger:
                last_outcome = run_cycle(config, runs, client, trigger, classifier)
                last_run = time.monotonic()
            time.sleep(config.poll_seconds)


def _due(config: TunerConfig, runs: RunLog, since_last_run: float, last_outcome: str) -> str | None:
    if runs.take_request():
        return "requested"
    if last_outcome in ("failed", "skipped") and since_last_run < config.retry_seconds:
        return None  # the same data would fail or skip again at once
    new = runs.new_ratings(runs.last_data_until())
    if new >= config.min_new_ratings:
        return "threshold"
    if config.period_seconds and new and since_last_run >= config.period_seconds:
        return "period"
    return None
