"""A real LoRA adapter made with peft: register, promote (answers change), survive a restart, roll back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from instructd.client import ApiError

from ..lora import MARKER, train_marker_adapter

HELD_OUT = "Who painted the Mona Lisa?"  # not among the prompts the adapter was trained on


@pytest.fixture(scope="module")
def marker_adapter(server, model_dir):
    return train_marker_adapter(model_dir, server.adapter_dir / "marker")


def ask(client, **options) -> str:
    return client.generate(HELD_OUT, max_tokens=24, temperature=0, **options).text


def test_register_promote_restart_and_roll_back(server, client, admin, marker_adapter):
    base_answer = ask(client)
    assert MARKER not in base_answer

    adapter = admin.register(str(marker_adapter), metadata={"purpose": "test"})
    assert adapter.status == "registered" and adapter.parent_version == 0
    assert adapter.base_model == "SmolLM2-135M-Instruct" and adapter.metadata["purpose"] == "test"
    assert adapter.metadata["lora"]["r"] == 8
    # Registering copies the folder: later edits to the source cannot change the version.
    shutil.rmtree(marker_adapter / "README.md", ignore_errors=True)
    (marker_adapter / "adapter_config.json").write_text("{}")

    promotion = admin.promote(adapter.version, expected_current=0)
    assert (promotion.previous_version, promotion.promoted_version) == (0, adapter.version)
    answer = client.generate(HELD_OUT, max_tokens=24, temperature=0)
    assert answer.adapter_version == adapter.version
    assert MARKER in answer.text
    assert server.exchange(answer.response_id)["adapter_version"] == adapter.version
    assert ask(client, adapter="base") == base_answer  # the base stays available beside it
    assert server.metrics()["instructd_promoted_adapter_version"] == adapter.version

    with pytest.raises(ApiError) as lost_race:
        admin.promote(0, expected_current=adapter.version + 1)
    assert lost_race.value.code.name == "ABORTED"

    server.restart()
    rows, promoted = admin.adapters()
    assert promoted == adapter.version and rows[0].status == "promoted"
    assert MARKER in ask(client)

    rollback = admin.rollback()
    assert (rollback.previous_version, rollback.promoted_version) == (adapter.version, 0)
    assert ask(client) == base_answer
    assert ask(client, adapter=adapter.version).startswith(MARKER[:4])  # still servable by name
    rows, promoted = admin.adapters()
    assert promoted == 0 and rows[0].status == "rolled_back"
    stats = {s.adapter_version: s for s in client.stats().adapters}
    assert stats[adapter.version].exchanges >= 3


def test_a_rejected_version_is_never_served(server, client, admin, marker_adapter):
    folder = server.adapter_dir / "rejected-copy"
    shutil.copytree(admin.adapters()[0][-1].path, folder)
    rejected = admin.register(str(folder), rejected=True)
    assert rejected.status == "rejected"
    for call in (lambda: admin.promote(rejected.version), lambda: ask(client, adapter=rejected.version)):
        with pytest.raises(ApiError) as error:
            call()
        assert error.value.code.name == "FAILED_PRECONDITION"


def _config(folder, **changes) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").chmod(0o644)
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))


# Each case builds a bad folder from a copy of a registered (good) version.
BAD_FOLDERS = {
    "missing": ("NOT_FOUND", None),
    "outside": ("PERMISSION_DENIED", None),
    "empty": ("INVALID_ARGUMENT", lambda f, src: f.mkdir()),
    "not_lora": ("INVALID_ARGUMENT", lambda f, src: _config(f, peft_type="PREFIX_TUNING")),
    "other_base": ("INVALID_ARGUMENT", lambda f, src: _config(f, base_model_name_or_path="meta-llama/Llama-3.1-8B")),
    "wrong_shapes": ("INVALID_ARGUMENT", lambda f, src: _write_lora(f, width=4096)),
    "narrow_shapes": ("INVALID_ARGUMENT", lambda f, src: _write_lora(f, width=64)),  # vLLM would take it silently
    "rank_not_integer": ("INVALID_ARGUMENT", lambda f, src: _config(f, r="8")),
    "config_not_object": ("INVALID_ARGUMENT", lambda f, src: (f / "adapter_config.json").write_text("[1, 2]")),
    "config_not_utf8": ("INVALID_ARGUMENT", lambda f, src: (f / "adapter_config.json").write_bytes(b"{\xff\xfe}")),
    "dora": ("INVALID_ARGUMENT", lambda f, src: _config(f, use_dora=True)),             # vLLM's own check
    "module_vllm_lacks": ("INVALID_ARGUMENT", lambda f, src: _write_lora(f, width=576, module="mlp.fc9")),
    "symlinked_weights": ("INVALID_ARGUMENT", lambda f, src: _link(f, "adapter_model.safetensors")),
}


def _prepare(case, folder, source):
    if folder.is_symlink() or folder.exists():
        folder.unlink() if folder.is_symlink() else shutil.rmtree(folder)
    make = BAD_FOLDERS[case][1]
    if make is None:
        return
    if case not in ("empty", "wrong_shapes", "narrow_shapes", "module_vllm_lacks"):
        shutil.copytree(source, folder)
        for file in folder.iterdir():
            file.chmod(0o644)
    make(folder, source)


def _link(folder, name) -> None:
    outside = folder.parent.parent / f"outside-{name}"
    shutil.copy(folder / name, outside)
    (folder / name).unlink()
    (folder / name).symlink_to(outside)


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_adapter_folders_are_refused(server, client, admin, marker_adapter, case):
    before = admin.adapters()[0]
    folder = server.adapter_dir / f"bad-{case}"
    _prepare(case, folder, before[-1].path)  # the registered copy of the marker adapter
    path = str(server.adapter_dir / ".." / "elsewhere") if case == "outside" else str(folder)
    if case == "outside":
        (server.adapter_dir / ".." / "elsewhere").mkdir(exist_ok=True)
    with pytest.raises(ApiError) as error:
        admin.register(path)
    assert error.value.code.name == BAD_FOLDERS[case][0], error.value.details
    assert len(error.value.details) < 500
    assert admin.adapters()[0] == before  # nothing registered
    assert not list(server.data_dir.glob("adapters/.staging-*"))  # nothing left behind
    assert client.generate("Say hi.", max_tokens=4).text  # and the server keeps serving


@pytest.mark.parametrize("path, code", [
    ("a\0b", "INVALID_ARGUMENT"),          # a NUL byte
    ("n" * 300, "INVALID_ARGUMENT"),        # a name longer than any file system allows
    ("loop/inside", "INVALID_ARGUMENT"),     # a symbolic link loop
])
def test_unusable_paths_are_invalid_not_internal(server, admin, path, code):
    loop = server.adapter_dir / "loop"
    if not loop.is_symlink():
        loop.symlink_to(loop)
    with pytest.raises(ApiError) as error:
        admin.register(path)
    assert error.value.code.name == code
    assert "n" * 50 not in error.value.details  # quoted, at most, by a short prefix


def test_only_the_adapter_files_are_copied(server, admin, marker_adapter):
    folder = server.adapter_dir / "with-extras"
    shutil.copytree(admin.adapters()[0][-1].path, folder)
    (folder / "huge.bin").write_bytes(b"\0" * (16 << 20))
    (folder / "notes").mkdir()
    adapter = admin.register(str(folder))
    kept = sorted(p.name for p in Path(adapter.path).iterdir())
    assert kept == ["adapter_config.json", "adapter_model.safetensors", "instructd_training.json"]
    assert oct(Path(adapter.path).stat().st_mode & 0o777) == "0o700"
    assert all(p.stat().st_mode & 0o777 == 0o400 for p in Path(adapter.path).iterdir())


def test_an_adapter_that_fails_to_load_fails_its_request_only(server, client, admin, marker_adapter):
    folder = server.adapter_dir / "to-break"
    shutil.copytree(admin.adapters()[0][-1].path, folder)
    adapter = admin.register(str(folder))
    weights = Path(adapter.path) / "adapter_model.safetensors"
    weights.chmod(0o600)
    weights.write_bytes(b"not safetensors any more")  # damaged on disk after registration
    before = server.metrics()['instructd_adapter_load_failures_total{phase="request"}']
    with pytest.raises(ApiError) as error:
        ask(client, adapter=adapter.version)
    assert error.value.code.name == "FAILED_PRECONDITION"
    assert server.metrics()['instructd_adapter_load_failures_total{phase="request"}'] == before + 1
    assert client.generate("Say hi.", max_tokens=4).text  # the engine still serves
    with pytest.raises(ApiError) as error:
        admin.promote(adapter.version)
    assert error.value.code.name == "FAILED_PRECONDITION"


def test_unknown_versions_are_not_found(client, admin):
    for call in (lambda: admin.promote(999), lambda: ask(client, adapter=999), lambda: admin.rollback(999),
                 lambda: admin.register("x", parent_version=999)):
        with pytest.raises(ApiError) as error:
            call()
        assert error.value.code.name == "NOT_FOUND"


def _write_lora(folder, width: int, module: str = "self_attn.q_proj") -> None:
    """A LoRA folder whose tensors fit a model of another width (or a module the model lacks)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                            "target_modules": [module.rsplit(".", 1)[-1]]}))
    name = f"base_model.model.model.layers.0.{module}"
    save_file({f"{name}.lora_A.weight": torch.zeros(8, width), f"{name}.lora_B.weight": torch.zeros(576, 8)},
              str(folder / "adapter_model.safetensors"))
