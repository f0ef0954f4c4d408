"""The live canary on a real server: simulated users, each routed by a hash of their id, rate the answers of the
version they see. Users who prefer the candidate get it promoted; users who dislike it get it rolled back on its
own, with the users exposed bounded; users who cannot tell leave the incumbent serving once the limit comes. In
manual mode a canary survives a restart and waits for `instructd promote`. Plus the rule's error rates, simulated."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time

import pytest

from instructd.client.local import CLI
from instructd.server.canary import CanaryCall, CanaryRule, Tally, audience, in_canary

from ..conftest import ServerProcess
from ..lora import train_marker_adapter

USERS, SHARE, MAX_USERS, MAX_RATINGS = 200, 0.3, 30, 60
ROUNDS = 12  # rated rounds at most; each gives the candidate about MAX_USERS ratings


def _canary_server(root, mode: str) -> ServerProcess:
    return ServerProcess(root / "data", root / "server.log", "--canary", mode, "--canary-share", str(SHARE),
                         "--canary-max-users", str(MAX_USERS), "--canary-max-ratings", str(MAX_RATINGS),
                         "--generate-per-second", "0", "--feedback-per-second", "0")


@pytest.fixture(scope="module")
def canary_server(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("canary")
    server = _canary_server(root, "auto")
    server.start()
    folder = train_marker_adapter(model_dir, server.adapter_dir / "marker", steps=2)
    with server.client() as admin:
        _, key = admin.create_key("canary-test", "app")
    yield server, str(folder), key
    if server.proc.poll() is None:
        assert server.stop() == 0


def _likes(user: int, round_: int, share_up: float) -> bool:
    """A user's verdict, spread evenly rather than drawn: `share_up` of the users like what they saw, every round."""
    return (user * 7 + round_ * 3) % 10 < share_up * 10


async def _round(server: ServerProcess, key: str, round_: int, up: dict[str, float] | None) -> dict[int, int]:
    """Every user asks once; with `up` ({"candidate": p, "incumbent": p}) each rates what they got. Returns the
    version each user was answered by."""
    seen: dict[int, int] = {}
    limit = asyncio.Semaphore(16)
    canary = server.client().canary()
    candidate = canary.version if canary else None

    async def user(i: int, client) -> None:
        async with limit:
            answer = await client.generate(f"Say a word for round {round_}.", max_tokens=1, user_id=f"user{i}")
            seen[i] = answer.adapter_version
            if up is not None:
                arm = "candidate" if answer.adapter_version == candidate else "incumbent"
                rating = "up" if _likes(i, round_, up[arm]) else "down"
                await client.feedback(answer.response_id, rating, user_id=f"user{i}")

    client = server.async_client(key)
    try:
        await asyncio.gather(*(user(i, client) for i in range(USERS)))
    finally:
        await client.close()
    return seen


def _until_decided(server: ServerProcess, key: str, up: dict[str, float]) -> int:
    """Rated rounds until the canary ends; returns how many it took."""
    for n in range(1, ROUNDS + 1):
        asyncio.run(_round(server, key, n, up))
        if _wait(server, lambda canary: canary is None):  # the server judges once a second
            return n
    raise AssertionError(f"the canary was still undecided after {ROUNDS} rounds: {server.client().canary()}")


def _wait(server: ServerProcess, done, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if done(server.client().canary()):
            return True
        time.sleep(0.2)
    return False


def _release(server: ServerProcess, folder: str) -> tuple[int, int]:
    """Registers the adapter again, as a new version, and releases it to a canary: (incumbent, candidate)."""
    with server.client() as admin:
        incumbent = admin.adapters()[1]
        version = admin.register(folder).version
        released = admin.promote(version, expected_current=incumbent, canary=True)
    assert released.promoted_version == incumbent and released.canary.version == version
    return incumbent, version


def _status(server: ServerProcess, version: int) -> str:
    with server.client() as admin:
        return next(a.status for a in admin.adapters()[0] if a.version == version)


def test_users_who_prefer_the_candidate_get_it_promoted(canary_server):
    server, folder, key = canary_server
    incumbent, version = _release(server, folder)
    assert incumbent == 0 and server.client().canary().mode == "auto" and _status(server, version) == "canary"

    # Unrated rounds decide nothing; each user sees one version, the candidate only users in its share, at most
    # MAX_USERS of them, and the same ones again.
    first, second = (asyncio.run(_round(server, key, r, None)) for r in (0, 0))
    assert first == second
    exposed = {u for u, v in first.items() if v == version}
    assert exposed <= {u for u in range(USERS) if in_canary(f"user{u}", version, SHARE)}
    assert len(exposed) == MAX_USERS  # about 60 users fall in a 30% share of 200: the cap bounds them
    assert set(first.values()) == {0, version}
    metrics = server.metrics()
    assert metrics["instructd_canary_adapter_version"] == version and metrics["instructd_canary_share"] == SHARE
    assert server.client().canary().users_exposed == MAX_USERS

    rounds = _until_decided(server, key, {"candidate": 0.9, "incumbent": 0.3})
    with server.client() as admin:
        assert admin.adapters()[1] == version, f"not promoted after {rounds} rounds"
        assert admin.tuning_status().canary is None
    assert _status(server, version) == "promoted"
    metrics = server.metrics()
    assert metrics['instructd_canary_outcomes_total{outcome="promoted"}'] == 1
    assert metrics["instructd_canary_adapter_version"] == 0 and metrics["instructd_canary_share"] == 0
    assert metrics[f'instructd_feedback_total{{adapter_version="{version}",rating="up"}}'] > 0


def test_users_who_dislike_the_candidate_get_it_rolled_back(canary_server):
    server, folder, key = canary_server
    incumbent, version = _release(server, folder)
    _until_decided(server, key, {"candidate": 0.1, "incumbent": 0.7})
    with server.client() as admin:
        assert admin.adapters()[1] == incumbent
    assert _status(server, version) == "rolled_back"
    exposed = {r["user_id"] for r in server.db().query(
        "SELECT DISTINCT user_id FROM exchanges WHERE adapter_version = ?", [version])}
    assert 0 < len(exposed) <= MAX_USERS
    assert server.metrics()['instructd_canary_outcomes_total{outcome="rolled_back"}'] == 1
    answer = server.client(key).generate("Hello", max_tokens=1, user_id=next(iter(exposed)))
    assert answer.adapter_version == incumbent  # never routed to again


def test_users_who_cannot_tell_leave_the_incumbent_at_the_limit(canary_server):
    server, folder, key = canary_server
    incumbent, version = _release(server, folder)
    rounds = _until_decided(server, key, {"candidate": 0.5, "incumbent": 0.5})
    assert rounds >= 2  # MAX_RATINGS needs two rounds of about MAX_USERS ratings
    with server.client() as admin:
        assert admin.adapters()[1] == incumbent
    assert _status(server, version) == "registered"
    assert server.metrics()['instructd_canary_outcomes_total{outcome="expired"}'] == 1


def test_requests_without_a_user_id_are_drawn_one_by_one(canary_server):
    """An application that sends no user ids still gives the canary its share: each such request is drawn on its
    own and counts as one user toward the cap."""
    server, folder, key = canary_server
    incumbent, version = _release(server, folder)
    with server.client(key) as app:
        served = [app.generate(f"Say a word, {i}.", max_tokens=1).adapter_version for i in range(40)]
    to_candidate = served.count(version)
    assert 0 < to_candidate < 40 and served.count(incumbent) == 40 - to_candidate, served  # ~30% of them, by chance
    assert _wait(server, lambda canary: canary.users_exposed == to_candidate)
    time.sleep(2)  # the server has counted them from its database since: each still counts once
    assert server.client().canary().users_exposed == to_candidate
    with server.client() as admin:
        admin.promote(incumbent, expected_current=incumbent)  # the incumbent stays, and the canary ends
    assert server.client().canary() is None and _status(server, version) == "registered"


def test_a_manual_canary_survives_a_restart_and_waits_for_an_operator(canary_server):
    server, folder, key = canary_server
    server.stop()
    manual = _canary_server(server.data_dir.parent, "manual")
    manual.start()
    try:
        incumbent, version = _release(manual, folder)
        manual.restart()
        canary = manual.client().canary()
        assert canary and canary.version == version and canary.mode == "manual"
        for n in range(1, 4):  # clearly no worse, past the ratings limit: in manual mode it waits for an operator
            asyncio.run(_round(manual, key, 100 + n, {"candidate": 0.8, "incumbent": 0.4}))
        assert _wait(manual, lambda canary: canary and canary.call == "no_worse")
        time.sleep(2)  # judged again since
        assert manual.client().canary().candidate_up + manual.client().canary().candidate_down > MAX_RATINGS
        assert manual.client().adapters()[1] == incumbent
        status = subprocess.run([*CLI, "tune", "--status", "--target", manual.target], env=manual.env(), capture_output=True, text=True)
        assert f"canary v{version}" in status.stdout and "no worse" in status.stdout, status.stdout + status.stderr
        approve = subprocess.run([*CLI, "promote", "--target", manual.target], env=manual.env(), capture_output=True, text=True)
        assert approve.returncode == 0, approve.stderr
        assert manual.client().adapters()[1] == version and manual.client().canary() is None
        assert _status(manual, version) == "promoted"
    finally:
        assert manual.stop() == 0


def test_the_rule_s_error_rates():
    """CanaryRule's stated rates: looks after every rating, up to 200 candidate ratings, the incumbent rated 9x as
    often. A candidate as good as the incumbent is rolled back at most 5% of the time; one 10 points worse is
    promoted at most 5% of the time. Clear differences are called the right way every time."""
    rule, rng = CanaryRule(), random.Random(0)

    def canary(p_candidate: float, p_incumbent: float) -> CanaryCall:
        c_up = c_down = i_up = i_down = 0
        while c_up + c_down < 200:
            if rng.random() < 0.1:
                c_up, c_down = (c_up + 1, c_down) if rng.random() < p_candidate else (c_up, c_down + 1)
            else:
                i_up, i_down = (i_up + 1, i_down) if rng.random() < p_incumbent else (i_up, i_down + 1)
            call = rule.call(Tally(c_up, c_down, i_up, i_down))[0]
            if call is not CanaryCall.UNDECIDED:
                return call
        return CanaryCall.UNDECIDED

    n = 1000
    assert sum(canary(0.5, 0.5) is CanaryCall.WORSE for _ in range(n)) <= 0.05 * n
    assert sum(canary(0.4, 0.5) is CanaryCall.NO_WORSE for _ in range(n)) <= 0.05 * n
    assert all(canary(0.8, 0.4) is CanaryCall.NO_WORSE for _ in range(100))
    assert all(canary(0.2, 0.6) is CanaryCall.WORSE for _ in range(100))


def test_users_fall_in_the_share_by_hash():
    inside = [u for u in range(10_000) if in_canary(f"u{u}", 3, 0.1)]
    assert 900 <= len(inside) <= 1100
    assert inside == [u for u in range(10_000) if in_canary(f"u{u}", 3, 0.1)]  # the same users every time
    assert len(set(inside) & {u for u in range(10_000) if in_canary(f"u{u}", 4, 0.1)}) < 200  # each canary its own
    assert not in_canary("", 3, 0.99)  # no one to draw
    assert (audience("ann", "a.5f0c"), audience("", "a.5f0c")) == ("ann", "#a.5f0c")  # no user id: the request
