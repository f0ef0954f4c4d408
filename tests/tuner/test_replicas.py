"""Two serving replicas and one tuner, each with its own directory (no shared file), on one machine: ratings reach
the replica that made the answer wherever they arrive; the tuner learns from both, promotes on the one that
answers and names the one that does not, brings it in step when it returns, and then learns from it too."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from examples.simulate_users import simulate
from instructd.client import ApiError
from instructd.client.local import tuner_command
from instructd.v1 import instructd_pb2 as pb

from ..conftest import ServerProcess


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    a = ServerProcess(root / "a" / "data", root / "a.log")
    b = ServerProcess(root / "b" / "data", root / "b.log")
    # No canary: each replica would judge its own (test_loop and test_canary cover it); here a pass promotes at once.
    a.serve_args += ("--replica-id", "a", "--peer", f"b={b.target}", "--canary", "off")
    b.serve_args += ("--replica-id", "b", "--peer", f"a={a.target}", "--canary", "off")
    a.start()
    b.start()
    with a.client() as admin_a, b.client() as admin_b:
        keys = {}
        for app, role in (("users", "app"), ("tuner", "tuner")):
            keys[app] = admin_a.create_key(app, role)[1]
            admin_b.create_key(app, role, secret=keys[app])  # one key, valid on every replica
    yield a, b, keys, root / "tuner"
    for server in (a, b):
        if server.proc.poll() is None:
            server.stop()


def test_a_rating_reaches_the_replica_that_made_the_answer(cluster):
    a, b, keys, _ = cluster
    with a.client(keys["users"]) as on_a, b.client(keys["users"]) as on_b:
        answer = on_a.generate("Name a river.", max_tokens=8, user_id="ann")
        assert answer.response_id.startswith("a.")
        feedback_id = on_b.feedback(answer.response_id, "up", user_id="ann", comment="rated at b")
        with pytest.raises(ApiError) as error:
            on_b.feedback("c." + "0" * 32, "up")  # a replica no one knows
        assert error.value.code.name == "NOT_FOUND"
    assert a.db()["feedback"].get(feedback_id)["comment"] == "rated at b"
    assert b.db()["feedback"].count == 0


def test_a_replica_away_is_named_then_caught_up_then_learnt_from(cluster):
    a, b, keys, work_dir = cluster
    asyncio.run(simulate(a.target, count=100, correction_share=0.5, poisoned=False, seed=0, api_key=keys["users"]))
    asyncio.run(simulate(b.target, count=60, correction_share=0.5, poisoned=False, seed=3, api_key=keys["users"]))
    b.stop()  # b is down for the whole run
    with a.client() as admin_a:
        for seed in (0, 5):  # learnt by the second batch at the latest, as in test_loop
            if seed:
                asyncio.run(simulate(a.target, count=100, correction_share=0.5, poisoned=False, seed=seed,
                                     api_key=keys["users"]))
            # No rehearsal: replicas are what this tests (test_loop trains with it), and its answers of up to
            # 512 tokens lengthen every training batch.
            subprocess.run(tuner_command([a.target, b.target], work_dir, "--once", "--rehearsal", "0"), check=True,
                           timeout=2400, env=a.env(keys["tuner"]))
            run = admin_a.tuning_status().runs[0]
            if run.status != "rejected" or run.verdict.decision != pb.GATE_TOO_LITTLE_EVIDENCE:
                break
        assert run.status == "promoted", run.reason
        assert f"{b.target}:" in run.reason and "did not answer" in run.reason  # b is named, not forgotten
        serving_a = next(x for x in admin_a.adapters()[0] if x.version == run.candidate_version)
        assert not [i for i in serving_a.metadata["exchange_ids"] if not i.startswith("a.")]

    b.start()  # b returns, still on the base model; the tuner, running on, brings it in step and learns from it
    # Ten steps: this run only has to be judged, not to win (the first one showed learning).
    follow = subprocess.Popen(tuner_command([a.target, b.target], work_dir, "--poll-seconds", "1", "--steps", "10",
                                            "--rehearsal", "0"),
                              env=a.env(keys["tuner"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with b.client() as admin_b:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # another process does it: poll, with a deadline
                adapters, serving = admin_b.adapters()
                if serving and next(x for x in adapters if x.version == serving).sha256 == serving_a.sha256:
                    break
                time.sleep(1)
            else:
                pytest.fail("b was not brought in step with a")
            deadline = time.monotonic() + 2400
            while time.monotonic() < deadline:  # b's 60 ratings are new to the tuner: a run starts by itself
                runs = admin_b.tuning_status().runs
                if runs and runs[0].status not in ("running",):
                    break
                time.sleep(2)
            else:
                pytest.fail("no run on b's ratings")
    finally:
        follow.kill()
        follow.wait()
    assert runs[0].status in ("promoted", "rejected"), runs[0].reason  # b's ratings were judged...
    with a.client() as admin_a:
        latest = admin_a.tuning_status().runs[0].candidate_version
        candidate = next(x for x in admin_a.adapters()[0] if x.version == latest)
    learnt = set(candidate.metadata["exchange_ids"])
    assert any(i.startswith("b.") for i in learnt)  # ...and learnt from: the candidate was trained on them too...
    # ...from the base (the default), on everything the serving version learnt as well: nothing stacks on it.
    assert candidate.metadata["weights_from"] == "base" and candidate.parent_version == serving_a.version
    assert set(serving_a.metadata["exchange_ids"]) < learnt
