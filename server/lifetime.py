"""Processes that end with the server: kill -9 of the server's pid alone must not leave vLLM's engine core holding
the model's memory and CPU cores, nor `instructd serve`'s tuner beside the one a restart starts. vLLM's workers
watch their engine core, but the engine core (spawned, not forked, on CPU) watches nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

GRACE_SECONDS = 10.0
_kept: list = []  # each watchdog and its pipe's writer, open for as long as this process lives


def exit_with_parent(every: float = 1.0) -> None:
    """Ends this process once its parent is gone (it was re-parented): SIGTERM to itself, so that its own handlers
    shut it down cleanly, then SIGKILL if it still runs `GRACE_SECONDS` later. Watches from a daemon thread."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(GRACE_SECONDS)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="instructd-exit-with-parent", daemon=True).start()


def children_end_with_this_process() -> None:
    """Starts a watchdog process that, once this one has exited for any reason, ends the children it has now:
    SIGTERM, then SIGKILL to those still running `GRACE_SECONDS` later. It learns of the exit as EOF on a pipe
    whose only writer is this process; a child is known by its pid and start time, so a reused pid is spared."""
    children = [f"{pid}:{start}" for pid, start in _children(os.getpid())]
    read, write = os.pipe()  # both ends non-inheritable: no other child holds the writer
    _kept.append((subprocess.Popen([sys.executable, "-m", __name__, *children], stdin=read), write))
    os.close(read)


def _children(parent: int) -> list[tuple[int, int]]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        if (fields := _stat(stat)) and int(fields[1]) == parent:
            found.append((int(stat.parent.name), int(fields[19])))
    return found


def _stat(path: Path) -> list[str] | None:
    """/proc/PID/stat from its third field (state, ppid, ..., start time at index 19); None once it is gone."""
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _running(pid: int, start: int) -> bool:
    fields = _stat(Path(f"/proc/{pid}/stat"))
    return bool(fields) and fields[0] != "Z" and int(fields[19]) == start


def _watchdog(children: list[tuple[int, int]]) -> None:
    sys.stdin.buffer.read()  # returns at EOF: the process that started this one has exited
    _signal(children, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while any(_running(*child) for child in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal(children, signal.SIGKILL)


def _signal(children: list[tuple[int, int]], sig: int) -> None:
    for pid, start in children:
        if _running(pid, start):
            os.kill(pid, sig)

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the server, which then ends its children
    _watchdog([tuple(map(int, arg.split(":"))) for arg in sys.argv[1:]])
