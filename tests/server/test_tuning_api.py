"""The Tuning service a remote tuner lives on, against the real server: the export resumes from any cursor without
losing or repeating a rating; an upload is checked byte for byte, and one cut off midway registers nothing and
leaves nothing behind; a download gives back the very files."""

from __future__ import annotations

import pytest

from instructd.client import ApiError
from instructd.client.tuning import TuningClient, upload_messages
from instructd.v1 import instructd_pb2 as pb

from ..lora import train_marker_adapter


@pytest.fixture(scope="module")
def tuner(server, admin):
    with TuningClient(server.target, api_key=admin.create_key("instructd-tuner", "tuner")[1]) as client:
        yield client


def test_the_export_resumes_from_any_cursor(server, admin, tuner):
    _, key = admin.create_key("export-cursor", "app")
    with server.client(key) as app:
        answers = [app.generate(f"Name fruit number {i}.", max_tokens=4) for i in range(6)]
        for i, answer in enumerate(answers):
            app.feedback(answer.response_id, "up", user_id="u")
        rows = list(tuner.export(app_id="export-cursor"))
        assert [r.exchange_id for r in rows] == [a.response_id for a in answers]
        cursors = [r.cursor for r in rows]
        assert cursors == sorted(set(cursors))  # strictly increasing: a resume point for each
        resumed = list(tuner.export(after=cursors[2], app_id="export-cursor"))
        assert [r.cursor for r in resumed] == cursors[3:]
        app.feedback(answers[0].response_id, "down", correction="An apple.", user_id="u")  # changed: again, once
    changed = list(tuner.export(after=cursors[-1], app_id="export-cursor"))
    assert [(r.exchange_id, r.rating, r.correction) for r in changed] == [(answers[0].response_id, pb.RATING_DOWN,
                                                                           "An apple.")]
    every = list(tuner.export(app_id="export-cursor"))
    assert len(every) == 6 and len({r.exchange_id for r in every}) == 6
    held = {r.exchange_id for r in tuner.export(app_id="export-cursor", held_out=pb.HELD_OUT_ONLY)}
    rest = {r.exchange_id for r in tuner.export(app_id="export-cursor", held_out=pb.HELD_OUT_EXCLUDED)}
    assert held | rest == {r.exchange_id for r in every} and not held & rest


def test_uploads_are_checked_and_a_cut_one_leaves_nothing(server, admin, tuner, model_dir, tmp_path):
    folder = train_marker_adapter(model_dir, tmp_path / "upload", steps=1)
    before = admin.adapters()[0]
    staging = lambda: list(server.data_dir.glob("adapters/.staging-*"))  # noqa: E731

    cut = list(upload_messages(folder))[:-1]  # a tuner that died before its last chunk
    with pytest.raises(ApiError) as error:
        tuner.upload(iter(cut))
    assert error.value.code.name == "INVALID_ARGUMENT" and "announced" in error.value.details
    assert admin.adapters()[0] == before and not staging()

    uploaded = tuner.upload_adapter(folder, metadata={"run_id": 0})
    assert uploaded.status == "registered" and uploaded.sha256 and not staging()
    copy = tuner.download_adapter(uploaded.version, tmp_path / "download")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (copy / name).read_bytes() == (folder / name).read_bytes()


def test_an_application_key_cannot_download_a_version(server, app_key, tmp_path):
    with TuningClient(server.target, api_key=app_key) as app, pytest.raises(ApiError) as error:
        app.download_adapter(1, tmp_path / "nope")
    assert error.value.code.name == "PERMISSION_DENIED"
