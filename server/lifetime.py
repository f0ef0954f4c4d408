"""Processes that end with the server: kill -9 of the server's pid alone must not leave vLLM's engine core holding
the model's memory and CPU cores, nor `instructd serve`'s tuner beside the one a restart starts. vLLM's workers
watch their engine core, but the engine core (spawned, not forked, on CPU) watches nothing, nor does the tuner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

GRACE_SECONDS = 10.0
_watchdog: list = []  # the watchdog process and its pipe's writer, open for as long as this process lives


def end_with_this_process(pids: Iterable[int]) -> None:
    """Has a watchdog process end `pids` once this process has exited for any reason, kill -9 included: SIGTERM,
    then SIGKILL to those still running `GRACE_SECONDS` later. The watchdog, started by the first call, is told
    each pid on a pipe whose only writer is this process and learns of its exit as EOF there; a process is known
    by its pid and start time, so a reused pid is spared."""
    if not _watchdog:
        read, write = os.pipe()  # both ends non-inheritable: no other child holds the writer
        _watchdog.extend([subprocess.Popen([sys.executable, "-m", __name__], stdin=read), write])
        os.close(read)
    known = [(pid, fields[19]) for pid in pids if (fields := _stat(Path(f"/proc/{pid}/stat")))]
    os.write(_watchdog[1], "".join(f"{pid}:{start}\n" for pid, start in known).encode())


def children() -> list[int]:
    """The pids of this process's children now."""
    return [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
            if (fields := _stat(stat)) and int(fields[1]) == os.getpid()]


def _stat(path: Path) -> list[str] | None:
    """/proc/PID/stat from its third field (state, ppid, ..., start time at index 19); None once it is gone."""
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _running(pid: int, start: int) -> bool:
    fields = _stat(Path(f"/proc/{pid}/stat"))
    return bool(fields) and fields[0] != "Z" and int(fields[19]) == start


def _watch() -> None:
    watched = [tuple(map(int, line.split(":"))) for line in sys.stdin]  # until EOF: the server has exited
    _signal(watched, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while any(_running(*process) for process in watched) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal(watched, signal.SIGKILL)


def _signal(processes: list[tuple[int, int]], sig: int) -> None:
    for pid, start in processes:
        if _running(pid, start):
            os.kill(pid, sig)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the server, which then ends its children
    _watch()
