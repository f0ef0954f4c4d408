"""The newcomer's path, as README gives it: `instructd serve` (its tuner included) and the "Try it" commands with no
key given anywhere; serve made an admin key readable by its owner only, and a tuner key its tuner works with."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from instructd.client.local import CLI, LocalServer
from instructd.server.config import ENV_API_KEY, ENV_HOME


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """`instructd serve` with its defaults (its tuner on, its data in $INSTRUCTD_HOME), on ports of its own."""
    home = tmp_path_factory.mktemp("newcomer")
    env = {k: v for k, v in os.environ.items() if k != ENV_API_KEY} | {ENV_HOME: str(home)}
    with LocalServer(home, home / "serve.log", "--max-model-len", "1024", tuner=True, env=env) as server:
        yield home, env, f"localhost:{server.port}", server


def _cli(env, *args) -> str:
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_try_it_works_without_a_key_in_sight(home):
    folder, env, target, _ = home
    assert oct((folder / "admin.key").stat().st_mode & 0o777) == "0o600"
    asked = _cli(env, "ask", "Give three tips for staying healthy.", "--max-tokens", "16", "--target", target)
    response_id = asked.split("response_id: ")[1].split()[0]
    assert _cli(env, "feedback", response_id, "up", "--comment", "clear", "--target", target).startswith("feedback")
    stats = _cli(env, "stats", "--target", target)
    assert "default" in stats and "100%" in stats


def test_the_tuner_serve_started_works_with_a_tuner_key_of_its_own(home):
    folder, env, target, _ = home
    assert oct((folder / "tuner.key").stat().st_mode & 0o777) == "0o600"
    tuner_id = (folder / "tuner.key").read_text().split("_")[1]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the tuner is another process: its first calls mark the key used
        listed = _cli(env, "keys", "list", "--target", target)
        line = next(row for row in listed.splitlines() if row.startswith(tuner_id))
        if " tuner " in line and "instructd-tuner" in line and "20" in line.split()[4]:
            break
        time.sleep(2)
    else:
        pytest.fail(f"the tuner never used its key: {listed}")
    assert not (folder / "tuner" / "instructd.db").exists()  # its own directory, and no database in it


def test_kill_9_of_serve_alone_leaves_no_process_behind(home):
    """A supervisor that kills only serve's pid (not its process group) must not leave vLLM's engine core holding
    the model's memory, nor a tuner beside the one a restarted serve starts. Last in this module: it ends serve."""
    server = home[3]
    started = [p for p in psutil.Process(server.proc.pid).children(recursive=True) if _running(p)]
    names = " ".join(_command(p) for p in started)
    assert "EngineCore" in names and "tuner" in names, names
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=60)
    deadline = time.monotonic() + 120
    while any(map(_running, started)) and time.monotonic() < deadline:  # other processes' exits: nothing to await
        time.sleep(1)
    left = [p for p in started if _running(p)]
    for p in left:
        p.kill()
    assert not left, f"still running after serve was killed: {[_command(p) for p in left]}"


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE  # a zombie holds nothing but its pid
    except psutil.NoSuchProcess:
        return False


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        return ""
