"""Checks that a folder holds a PEFT LoRA adapter for the served base model, and copies it immutably."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors import safe_open

from .errors import InvalidRequest, NotFound, PermissionDenied

_LAYER = re.compile(r"\.layers\.(\d+)\.")
WEIGHTS_FILE = "adapter_model.safetensors"


def resolve_inside(path: str, root: Path) -> Path:
    """Resolves `path` (relative paths are taken from `root`) and refuses anything outside `root`."""
    if not path:
        raise InvalidRequest("path must not be empty")
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise PermissionDenied(f"{path} is outside the adapter directory {root}")
    if not resolved.is_dir():
        raise NotFound(f"adapter folder {resolved} does not exist")
    return resolved


def check_lora(folder: Path, base_config: dict, base_name: str, max_rank: int) -> dict:
    """Validates a PEFT LoRA folder against the served base model; returns its adapter_config."""
    config_file = folder / "adapter_config.json"
    if not config_file.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise InvalidRequest(f"{folder} is not a PEFT adapter: it needs adapter_config.json and {WEIGHTS_FILE}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{config_file} is not valid JSON: {exc}") from exc
    if config.get("peft_type") != "LORA":
        raise InvalidRequest(f"{folder} holds a {config.get('peft_type')!r} adapter; only LORA is served")
    rank = int(config.get("r") or 0)
    if not 1 <= rank <= max_rank:
        raise InvalidRequest(f"LoRA rank {rank} is outside 1..{max_rank} (the server's max_lora_rank)")
    trained_for = Path(str(config.get("base_model_name_or_path") or "")).name
    if trained_for and trained_for != base_name:
        raise InvalidRequest(f"adapter was trained for base model {trained_for!r}; this server serves {base_name!r}")
    _check_shapes(folder / WEIGHTS_FILE, base_config)
    return config


def _check_shapes(weights: Path, base_config: dict) -> None:
    """The name check can be fooled by a renamed folder; the tensor shapes cannot."""
    hidden, layers = base_config["hidden_size"], base_config["num_hidden_layers"]
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                layer = _LAYER.search(name)
                if layer and int(layer.group(1)) >= layers:
                    raise InvalidRequest(f"adapter has layer {layer.group(1)}; the base model has {layers} layers")
                if "lora_A" in name and name.split(".lora_A")[0].endswith(("q_proj", "k_proj", "v_proj")) \
                        and shape[-1] != hidden:
                    raise InvalidRequest(f"adapter tensor {name} expects width {shape[-1]}; the base model has {hidden}")
    except InvalidRequest:
        raise
    except Exception as exc:
        raise InvalidRequest(f"cannot read {weights}: {exc}") from exc


def copy_version(source: Path, versions_dir: Path, version: int) -> Path:
    """Copies the adapter into its own read-only folder: a registered version never changes."""
    target = versions_dir / f"v{version}"
    if target.exists():
        shutil.rmtree(target)  # left by a registration that crashed before committing
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoint-*", "*.bin", "optimizer.*"))
    for file in target.rglob("*"):
        if file.is_file():
            file.chmod(0o444)
    return target


