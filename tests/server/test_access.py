"""Who may do what, against the real server: every RPC without a key, with a bad or revoked key, and with a key
of a role that may not call it gets the right status and stores nothing; applications are tenants; keys are
shown once and stored as digests; admin and tuner actions are audited; a forgotten user leaves no trace."""

from __future__ import annotations

import re

import grpc
import pytest
from click.testing import CliRunner

from instructd.client import ApiError
from instructd.client.cli import main as cli
from instructd.server.config import ENV_API_KEY
from instructd.v1 import instructd_pb2 as pb
from instructd.v1 import instructd_pb2_grpc as pb_grpc

SAY_HI = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="Say hi.")],
                            sampling=pb.SamplingOptions(max_tokens=2))
# The specification, written out here rather than read from the code: which roles besides admin may call what.
MAY = {
    "Inference/Generate": {"app", "tuner"}, "Inference/GenerateStream": {"app", "tuner"},
    "Feedback/Submit": {"app"}, "Admin/GetStats": {"app"},
    "Admin/ListAdapters": {"tuner"}, "Admin/RegisterAdapter": {"tuner"}, "Admin/RecordEvaluation": {"tuner"},
    "Admin/Promote": {"tuner"}, "Admin/GetTuningStatus": {"tuner"},
    "Admin/Rollback": set(), "Admin/TriggerTuning": set(), "Access/CreateKey": set(), "Access/ListKeys": set(),
    "Access/RevokeKey": set(), "Access/ListAudit": set(), "Access/Forget": set(),
    "Tuning/ExportFeedback": {"tuner"}, "Tuning/UploadAdapter": {"tuner"}, "Tuning/DownloadAdapter": {"tuner"},
    "Tuning/StartRun": {"tuner"}, "Tuning/UpdateRun": {"tuner"}, "Tuning/ClaimRequest": {"tuner"},
    "Tuning/RecoverRuns": {"tuner"},
}
TABLES = ("exchanges", "feedback", "adapters", "promotions", "keys", "audit", "tuning_requests", "tuning_runs")
METHODS = {f"{s.name}/{m.name}": m for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}


def _requests(response_id: str, admin_key_id: str) -> dict:
    """A request per method that would change something if it were let through."""
    return {
        "Inference/Generate": SAY_HI, "Inference/GenerateStream": SAY_HI,
        "Feedback/Submit": pb.FeedbackRequest(response_id=response_id, rating=pb.RATING_DOWN, correction="Hi!"),
        "Admin/GetStats": pb.GetStatsRequest(), "Admin/ListAdapters": pb.ListAdaptersRequest(),
        "Admin/RegisterAdapter": pb.RegisterAdapterRequest(path="no-such-folder"),
        "Admin/RecordEvaluation": pb.RecordEvaluationRequest(version=1, verdict=pb.Verdict(passed=False)),
        "Admin/Promote": pb.PromoteRequest(version=0), "Admin/GetTuningStatus": pb.GetTuningStatusRequest(),
        "Admin/Rollback": pb.RollbackRequest(version=0), "Admin/TriggerTuning": pb.TriggerTuningRequest(),
        "Access/CreateKey": pb.CreateKeyRequest(app_id="mallory", role=pb.ROLE_ADMIN),
        "Access/ListKeys": pb.ListKeysRequest(), "Access/RevokeKey": pb.RevokeKeyRequest(id=admin_key_id),
        "Access/ListAudit": pb.ListAuditRequest(), "Access/Forget": pb.ForgetRequest(app_id="tests", user_id="alice"),
        "Tuning/ExportFeedback": pb.ExportRequest(), "Tuning/DownloadAdapter": pb.DownloadAdapterRequest(version=1),
        "Tuning/UploadAdapter": pb.AdapterUpload(header=pb.UploadHeader()),
        "Tuning/StartRun": pb.StartRunRequest(trigger=pb.TRIGGER_REQUESTED),
        "Tuning/UpdateRun": pb.UpdateRunRequest(id=1, outcome=pb.RUN_FAILED), "Tuning/ClaimRequest": pb.ClaimRequestRequest(),
        "Tuning/RecoverRuns": pb.RecoverRunsRequest(),
    }


def _call(server, method: str, request, authorization: str | None):
    service, name = method.split("/")
    with grpc.insecure_channel(server.target) as channel:
        stub = getattr(pb_grpc, f"{service}Stub")(channel)
        metadata = (("authorization", authorization),) if authorization else ()
        streams_in, streams_out = METHODS[method].client_streaming, METHODS[method].server_streaming
        call = getattr(stub, name)(iter([request]) if streams_in else request, metadata=metadata, timeout=60)
        return list(call) if streams_out else call


def _counts(server) -> dict:
    db = server.db()
    return {t: db[t].count for t in TABLES}


@pytest.fixture(scope="module")
def keys(admin):
    made = {role: admin.create_key("tests", role, f"access test {role}") for role in ("app", "tuner")}
    revoked_key, revoked = admin.create_key("tests", "admin", "to be revoked")
    admin.revoke_key(revoked_key.id)
    return {**{role: secret for role, (_, secret) in made.items()}, "revoked": revoked}


def test_every_method_has_a_policy():
    assert set(METHODS) == set(MAY)


def test_no_key_a_bad_key_or_a_revoked_key_is_unauthenticated_and_stores_nothing(server, client, admin, keys):
    answer = client.generate("Say hello.", max_tokens=4)
    requests = _requests(answer.response_id, admin.keys()[0].id)
    before = _counts(server)
    for method, request in requests.items():
        for authorization in (None, "Bearer nonsense", "Basic abc", f"Bearer {keys['revoked']}",
                              f"Bearer {keys['app'][:-4]}AAAA"):
            with pytest.raises(grpc.RpcError) as error:
                _call(server, method, request, authorization)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, authorization)
    assert _counts(server) == before


@pytest.mark.parametrize("role", ["app", "tuner"])
def test_a_role_that_may_not_call_is_denied_and_stores_nothing(server, client, admin, keys, role):
    answer = client.generate("Say hello.", max_tokens=4)
    requests = _requests(answer.response_id, admin.keys()[0].id)
    before = _counts(server)
    for method, request in requests.items():
        if role in MAY[method]:
            continue
        with pytest.raises(grpc.RpcError) as error:
            _call(server, method, request, f"Bearer {keys[role]}")
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
    assert _counts(server) == before
    assert admin.keys()[0].revoked_at == ""  # the admin key still stands


def test_a_tuner_promotes_only_by_compare_and_swap(server, admin, keys):
    with server.client(keys["tuner"]) as tuner:
        serving = tuner.adapters()[1]
        with pytest.raises(ApiError) as error:
            tuner.promote(serving)
        assert error.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert tuner.promote(serving, expected_current=serving).promoted_version == serving  # no change: allowed
        with pytest.raises(ApiError) as error:
            tuner.rollback(0)
        assert error.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_applications_are_tenants(server, admin):
    (_, a), (_, b) = admin.create_key("tenant-a", "app"), admin.create_key("tenant-b", "app")
    with server.client(a) as app_a, server.client(b) as app_b:
        answer = app_a.generate("Name a river.", max_tokens=8, user_id="alice")
        assert server.exchange(answer.response_id)["app_id"] == "tenant-a"
        with pytest.raises(ApiError) as error:
            app_b.feedback(answer.response_id, "down", correction="Steer the model.")
        with pytest.raises(ApiError) as unknown:
            app_b.feedback("f" * 32, "down")
        assert error.value.code == unknown.value.code == grpc.StatusCode.NOT_FOUND
        # Said exactly as for an answer that never existed: nothing tells B that A's answer is there.
        assert re.sub("'.*'", "?", error.value.details) == re.sub("'.*'", "?", unknown.value.details)
        assert {s.app_id for s in app_b.stats().adapters} <= {"tenant-b"}
        assert {s.app_id for s in app_a.stats().adapters} == {"tenant-a"}
        app_a.feedback(answer.response_id, "up", user_id="alice")
    row = next(server.db()["feedback"].rows_where("response_id = ?", [answer.response_id]))
    assert row["app_id"] == "tenant-a" and row["key_id"] == a.split("_")[1]
    assert {"tenant-a", "tests"} <= {s.app_id for s in admin.stats().adapters}  # an admin sees every application


def test_keys_are_shown_once_stored_as_digests_and_never_logged(server, admin, keys):
    secrets = [keys["app"], keys["tuner"], keys["revoked"], server.api_key]
    stored = "\n".join(str(r) for r in server.db()["keys"].rows)
    assert not [s for s in secrets if s.split("_", 2)[2] in stored]
    log = server.log_path.read_text()
    assert not [s for s in secrets if s.split("_", 2)[2] in log]
    metrics = str(server.metrics())
    assert not [s for s in secrets if s.split("_")[1] in metrics or s.split("_", 2)[2] in metrics]
    listed = {k.id: k for k in admin.keys()}
    assert listed[keys["revoked"].split("_")[1]].revoked_at
    assert listed[keys["app"].split("_")[1]].role == "app" and listed[keys["app"].split("_")[1]].created_at


def test_keys_audit_and_forget_from_the_command_line(server, admin):
    env = {ENV_API_KEY: server.api_key}
    run = lambda *args: CliRunner().invoke(cli, [*args, "--target", server.target], env=env)  # noqa: E731
    made = run("keys", "create", "--app", "cli-app", "--role", "app", "--name", "made by the CLI")
    assert made.exit_code == 0, made.output
    secret = made.output.strip().splitlines()[-1]
    with server.client(secret) as app:
        for user in ("carol", "carol", "dave"):
            answer = app.generate("Name a bird.", max_tokens=4, user_id=user)
            app.feedback(answer.response_id, "up", user_id=user, comment=f"{user} liked it")
    key_id = secret.split("_")[1]
    listed = run("keys", "list")
    assert key_id in listed.output and secret.split("_", 2)[2] not in listed.output
    forgotten = run("forget", "--app", "cli-app", "--user", "carol")
    assert forgotten.output.strip() == "deleted 2 exchanges and 2 ratings", forgotten.output
    db = server.db()
    assert not [r for r in db["exchanges"].rows_where("app_id = 'cli-app'") if "carol" in str(r)]
    assert not [r for r in db["feedback"].rows if "carol" in str(r)]
    assert not [r for r in db["audit"].rows if "carol" in str(r)]
    assert db["exchanges"].count_where("app_id = 'cli-app' AND user_id = 'dave'") == 1
    revoked = run("keys", "revoke", key_id)
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    with server.client(secret) as app, pytest.raises(ApiError) as error:
        app.generate("Name a bird.", max_tokens=4)
    assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
    audit = run("audit", "--limit", "10").output
    admin_id = server.api_key.split("_")[1]
    for action, target in [("key_created", key_id), ("user_forgotten", "app cli-app"), ("key_revoked", key_id)]:
        assert any(action in line and target in line and admin_id in line for line in audit.splitlines()), audit
