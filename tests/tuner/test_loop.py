"""The whole loop through the public API, as applications and operators drive it: simulated users ask
with a checkable instruction and rate by it; the tuner trains and gates; the candidate serves a canary (the
default) whose users' ratings promote it; a poisoned run is judged; a killed run leaves the registry clean;
restart keeps the promoted version; rollback restores."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
from instructd.client.local import CLI
from instructd.v1 import instructd_pb2 as pb

from examples.simulate_users import follow_rate, simulate

from ..conftest import ServerProcess


@pytest.fixture(scope="module")
def loop_server(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("loop")
    # The default canary (auto), on half the users rather than a tenth: the same rule decides on fewer answers.
    server = ServerProcess(root / "data", root / "server.log", "--canary-share", "0.5")
    server.start()
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def loop_client(loop_server):
    with loop_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def tuner_env(loop_server, loop_client):
    """The tuner runs with a tuner key of its own and a directory of its own: the API is its only link."""
    return loop_server.env(loop_client.create_key("instructd-tuner", "tuner")[1])


@pytest.fixture(scope="module")
def users_key(loop_client):
    """The simulated users' application key."""
    return loop_client.create_key("simulated-users", "app")[1]


@pytest.fixture(scope="module")
def base_rate(loop_server, users_key):
    return asyncio.run(follow_rate(loop_server.target, "base", api_key=users_key))


def rate_until_the_canary_ends(server: ServerProcess, client, users_key: str) -> int:
    """Rounds of 80 users, each asking once and rating (the hash of their id gives half of them the canary), until
    the canary's live ratings decide; the number of rounds."""
    for round_ in range(1, 6):
        asyncio.run(simulate(server.target, count=80, correction_share=0.5, poisoned=False, seed=10 + round_,
                             api_key=users_key, users=80))
        deadline = time.monotonic() + 15
        while client.canary() is not None and time.monotonic() < deadline:
            time.sleep(0.5)  # the server looks at its canary every second
        if client.canary() is None:
            return round_
    pytest.fail(f"the canary did not decide: {client.canary().describe()}")


def test_rated_instructions_are_learnt_by_the_second_batch_of_ratings(loop_server, loop_client, users_key, tuner_env,
                                                                      base_rate):
    """Ratings arrive in batches of 150 (about a third 👍, half of the 👎 on the instruction corrected), with a run
    after each. The first may be rejected for too little evidence, and then its ratings stay: the second run trains
    and judges on both batches. A candidate that clearly helps passes by then, serves a canary, and the live
    ratings of the users who get it promote it."""
    batches = []
    for seed in (0, 2):
        asyncio.run(simulate(loop_server.target, count=150, correction_share=0.5, poisoned=False, seed=seed,
                             api_key=users_key))
        batches.append({e["id"] for e in loop_server.db()["exchanges"].rows}.difference(*batches))
        subprocess.run(loop_server.tuner_command("--once"), check=True, timeout=2400, env=tuner_env)
        status = loop_client.tuning_status()
        run = status.runs[0]
        if run.status != "rejected":
            break
        assert run.verdict.decision == pb.GATE_TOO_LITTLE_EVIDENCE and "stay for the next run" in run.reason, run.reason
        assert status.learnt_until == 0 and status.new_ratings >= 150  # nothing used up
    print(f"passed the gate after {len(batches)} batch(es)")
    assert (run.status, run.trigger) == ("promoted", "requested"), run.reason
    assert "serving a canary to 50% of users" in run.reason, run.reason
    canary = loop_client.canary()
    assert (canary.version, canary.incumbent_version, canary.mode) == (run.candidate_version, 0, "auto")
    assert loop_client.adapters()[0][0].status == "canary"

    print(f"canary decided after {rate_until_the_canary_ends(loop_server, loop_client, users_key)} round(s) of users")
    adapters, promoted = loop_client.adapters()
    candidate = adapters[0]
    assert promoted == candidate.version == run.candidate_version and candidate.status == "promoted"
    assert candidate.parent_version == 0 and candidate.base_model == "SmolLM2-135M-Instruct"
    assert candidate.evaluation.passed and candidate.evaluation.candidate_suite >= 0
    # Each version was put to the suite once, and its results kept: the candidate's are its own once it serves.
    assert {p.stem for p in loop_server.tuner_dir.glob("suite-results/*.json")} == {"base", candidate.sha256}
    assert candidate.metadata["hyperparameters"]["objective"] == "sft" and candidate.metadata["weights_from"] == "base"
    assert len(candidate.metadata["exchange_ids"]) >= 20
    assert candidate.metadata["rehearsal"] >= 20  # the base's own answers to rehearsal prompts, trained on too
    trained_on = set(candidate.metadata["exchange_ids"])
    assert all(trained_on & batch for batch in batches)  # every batch taught it, the kept one too

    tuned_rate = asyncio.run(follow_rate(loop_server.target, None, api_key=users_key))
    print(f"held-out prompts answered in lowercase: base {base_rate:.0%}, tuned {tuned_rate:.0%}")
    assert tuned_rate >= base_rate + 0.25

    answer = loop_client.generate("Describe lighthouses. Answer in all lowercase letters.", max_tokens=32)
    assert answer.adapter_version == candidate.version
    assert loop_server.exchange(answer.response_id)["adapter_version"] == candidate.version
    metrics = loop_server.metrics()
    assert metrics['instructd_tuning_runs_total{outcome="promoted"}'] == 1
    assert metrics['instructd_canary_outcomes_total{outcome="promoted"}'] == 1
    assert metrics["instructd_promoted_adapter_version"] == candidate.version
    assert metrics['instructd_tuning_last_gate_score{gate="suite",model="candidate"}'] >= 0


def test_a_run_killed_mid_training_leaves_the_registry_clean(loop_server, loop_client, users_key, tuner_env):
    # New feedback from an attacker, inverted and "corrected" against the instruction; the next test runs
    # the cycle this one is killed in.
    asyncio.run(simulate(loop_server.target, count=80, correction_share=0.5, poisoned=True, seed=1,
                         api_key=users_key))
    before = loop_client.adapters()
    loop_client.trigger_tuning()
    proc = subprocess.Popen(loop_server.tuner_command("--steps", "1000", "--epochs", "1000"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=tuner_env)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            run = loop_client.tuning_status().runs[0]
            if run.status == "running" and run.step >= 2:
                break
            assert proc.poll() is None, "the tuner exited before training"
            time.sleep(1)  # watching another process's progress
        else:
            pytest.fail("the tuning run never reached step 2")
    finally:
        proc.kill()
        proc.wait()
    assert loop_client.adapters() == before  # nothing registered, nothing promoted


def test_the_next_run_recovers_from_the_killed_one(loop_server, loop_client, tuner_env):
    # Without rehearsal (the first test trained with it), and the serving adapter trained further on the new ratings
    # alone (`--start-from serving`): the candidate the poison moves most, which the gate must stop. One from the base
    # (the default; test_replicas trains one after a promotion) relearns what the serving version learnt as well, and
    # there the honest majority outweighed these 80 poisoned ratings once: it beat the serving adapter and passed.
    subprocess.run(loop_server.tuner_command("--once", "--rehearsal", "0", "--start-from", "serving"), check=True,
                   timeout=2400, env=tuner_env)

    runs = loop_client.tuning_status().runs
    latest, killed = runs[0], runs[1]
    assert killed.status == "failed" and "interrupted" in killed.reason
    assert latest.status in ("promoted", "rejected"), latest.reason  # it trained and was judged
    adapters, promoted = loop_client.adapters()
    assert adapters[0].version == latest.candidate_version
    assert adapters[0].status == ("canary" if latest.status == "promoted" else "rejected")  # a pass starts a canary
    assert promoted == adapters[1].version
    assert adapters[0].evaluation is not None
    assert adapters[0].metadata["weights_from"] == "parent" and adapters[0].parent_version == promoted
    assert not list(loop_server.tuner_dir.glob("candidates/.run-*.partial"))
    same = sum(r.status == latest.status for r in runs)
    assert loop_server.metrics()[f'instructd_tuning_runs_total{{outcome="{latest.status}"}}'] == same


def test_the_gate_rejects_poisoned_feedback(loop_server, loop_client):
    status = loop_client.tuning_status().runs[0]  # the run on the poisoned ratings above
    assert status.status == "rejected", status.reason


def test_restart_keeps_the_promoted_version_and_rollback_restores_the_base(loop_server, loop_client, users_key,
                                                                          base_rate):
    promoted = loop_client.adapters()[1]
    loop_server.restart()
    assert loop_client.adapters()[1] == promoted
    assert loop_client.generate("Say hi.", max_tokens=8).adapter_version == promoted

    out = subprocess.run([*CLI, "rollback", "0", "--target", loop_server.target], check=True, capture_output=True,
                         text=True, env=loop_server.env()).stdout
    assert out.strip() == f"serving base (was v{promoted})"
    assert asyncio.run(follow_rate(loop_server.target, None, api_key=users_key)) == base_rate
    stats = {s.adapter_version: s for s in loop_client.stats().adapters}
    assert stats[promoted].exchanges > 0 and stats[0].ratings_up + stats[0].ratings_down > 0
