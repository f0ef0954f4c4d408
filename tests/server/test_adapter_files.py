"""Which files of an adapter folder a version takes, on a real file system: the ones it needs, regular files
only, each within its cap, and nothing left behind when one is refused."""

from __future__ import annotations

import pytest

from instructd.server.adapters import stage
from instructd.server.errors import InvalidRequest


def _folder(tmp_path, weights: bytes = b"w" * 100):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def test_only_what_a_version_needs_is_copied_read_only(tmp_path):
    folder = _folder(tmp_path)
    (folder / "optimizer.pt").write_bytes(b"o" * 1000)
    staged = stage(folder, tmp_path / "versions", max_bytes=1000)
    assert sorted(p.name for p in staged.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(p.stat().st_mode & 0o777 == 0o400 for p in staged.iterdir())


@pytest.mark.parametrize("case", ["too_big", "symlink", "directory"])
def test_refused_files_leave_nothing_behind(tmp_path, case):
    folder = _folder(tmp_path, b"w" * (2000 if case == "too_big" else 10))
    if case == "symlink":
        (tmp_path / "secret").write_text("outside the adapter directory")
        (folder / "adapter_config.json").unlink()
        (folder / "adapter_config.json").symlink_to(tmp_path / "secret")
    elif case == "directory":
        (folder / "adapter_model.safetensors").unlink()
        (folder / "adapter_model.safetensors").mkdir()
    with pytest.raises(InvalidRequest):
        stage(folder, tmp_path / "versions", max_bytes=1000)
    assert list((tmp_path / "versions").iterdir()) == []
