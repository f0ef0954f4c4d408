"""A real LoRA adapter made with peft: register, promote (answers change), survive a restart, roll back."""

from __future__ import annotations

import json
import shutil

import pytest

from instructd.client import ApiError

from ..lora import MARKER, train_marker_adapter

HELD_OUT = "Who painted the Mona Lisa?"  # not among the prompts the adapter was trained on


@pytest.fixture(scope="module")
def marker_adapter(server, model_dir):
    return train_marker_adapter(model_dir, server.adapter_dir / "marker")


def ask(client, **options) -> str:
    return client.generate(HELD_OUT, max_tokens=24, temperature=0, **options).text


def test_register_promote_restart_and_roll_back(server, client, marker_adapter):
    base_answer = ask(client)
    assert MARKER not in base_answer

    adapter = client.register(str(marker_adapter), metadata={"purpose": "test"})
    assert adapter.status == "registered" and adapter.parent_version == 0
    assert adapter.base_model == "SmolLM2-135M-Instruct" and adapter.metadata["purpose"] == "test"
    assert adapter.metadata["lora"]["r"] == 8
    # Registering copies the folder: later edits to the source cannot change the version.
    shutil.rmtree(marker_adapter / "README.md", ignore_errors=True)
    (marker_adapter / "adapter_config.json").write_text("{}")

    promotion = client.promote(adapter.version, expected_current=0)
    assert (promotion.previous_version, promotion.promoted_version) == (0, adapter.version)
    answer = client.generate(HELD_OUT, max_tokens=24, temperature=0)
    assert answer.adapter_version == adapter.version
    assert MARKER in answer.text
    assert server.exchange(answer.response_id)["adapter_version"] == adapter.version
    assert ask(client, adapter="base") == base_answer  # the base stays available beside it
    assert server.metrics()["instructd_promoted_adapter_version"] == adapter.version

    with pytest.raises(ApiError) as lost_race:
        client.promote(0, expected_current=adapter.version + 1)
    assert lost_race.value.code.name == "ABORTED"

    server.restart()
    rows, promoted = client.adapters()
    assert promoted == adapter.version and rows[0].status == "promoted"
    assert MARKER in ask(client)

    rollback = client.rollback()
    assert (rollback.previous_version, rollback.promoted_version) == (adapter.version, 0)
    assert ask(client) == base_answer
    assert ask(client, adapter=adapter.version).startswith(MARKER[:4])  # still servable by name
    rows, promoted = client.adapters()
    assert promoted == 0 and rows[0].status == "rolled_back"
    stats = {s.adapter_version: s for s in client.stats().adapters}
    assert stats[adapter.version].exchanges >= 3


def test_a_rejected_version_is_never_served(server, client, marker_adapter, tmp_path):
    folder = server.adapter_dir / "rejected-copy"
    shutil.copytree(client.adapters()[0][-1].path, folder)
    rejected = client.register(str(folder), rejected=True)
    assert rejected.status == "rejected"
    for call in (lambda: client.promote(rejected.version), lambda: ask(client, adapter=rejected.version)):
        with pytest.raises(ApiError) as error:
            call()
        assert error.value.code.name == "FAILED_PRECONDITION"


@pytest.mark.parametrize("case, code", [
    ("missing", "NOT_FOUND"),
    ("outside", "PERMISSION_DENIED"),
    ("empty", "INVALID_ARGUMENT"),
    ("not_lora", "INVALID_ARGUMENT"),
    ("other_base", "INVALID_ARGUMENT"),
    ("wrong_shapes", "INVALID_ARGUMENT"),
])
def test_bad_adapter_folders_are_refused(server, client, marker_adapter, case, code):
    folder = server.adapter_dir / f"bad-{case}"
    shutil.rmtree(folder, ignore_errors=True)
    source = client.adapters()[0][-1].path  # the registered copy of the marker adapter
    if case == "outside":
        folder = server.adapter_dir / ".." / "elsewhere"
        folder.mkdir(exist_ok=True)
    elif case == "empty":
        folder.mkdir()
    elif case in ("not_lora", "other_base"):
        shutil.copytree(source, folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update({"peft_type": "PREFIX_TUNING"} if case == "not_lora" else
                      {"base_model_name_or_path": "meta-llama/Llama-3.1-8B"})
        (folder / "adapter_config.json").chmod(0o644)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    elif case == "wrong_shapes":
        _write_lora_with_width(folder, width=4096)
    with pytest.raises(ApiError) as error:
        client.register(str(folder))
    assert error.value.code.name == code
    assert client.generate("Say hi.", max_tokens=4).text  # and the server keeps serving


def test_unknown_versions_are_not_found(client):
    for call in (lambda: client.promote(999), lambda: ask(client, adapter=999), lambda: client.rollback(999),
                 lambda: client.register("x", parent_version=999)):
        with pytest.raises(ApiError) as error:
            call()
        assert error.value.code.name == "NOT_FOUND"


def _write_lora_with_width(folder, width: int) -> None:
    """A LoRA folder whose tensors fit a wider model than the one served."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                            "target_modules": ["q_proj"]}))
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({name: torch.zeros(8, width)}, str(folder / "adapter_model.safetensors"))
