"""Adapter folders a caller names: where they may be, which files of them are taken (copied once, never
through a symbolic link, within a size cap), and whether they fit the served base model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from pathlib import Path

from safetensors import safe_open

from .errors import InvalidRequest, NotFound, PermissionDenied, preview

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_MODULE = re.compile(r"\.([A-Za-z0-9_]+)\.lora_([AB])\.weight$")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
LINEAGE_FILE = "instructd_training.json"  # written by the tuner: hyper-parameters and data ids
# The files a version keeps, and the most bytes each may have (None: the server's max_adapter_bytes).
FILES = {CONFIG_FILE: 1 << 16, WEIGHTS_FILE: None, LINEAGE_FILE: 32 << 20}
_MAX_PATH = 4096


def resolve_inside(path: str, root: Path) -> Path:
    """Resolves `path` (relative paths are taken from `root`) and refuses anything outside `root`."""
    if not path:
        raise InvalidRequest("path must not be empty")
    if "\0" in path or len(path) > _MAX_PATH or any(len(part.encode()) > 255 for part in Path(path).parts):
        raise InvalidRequest(f"path is not a usable folder name: {preview(path)}")
    try:
        resolved = (root / path).resolve()
    except (OSError, RuntimeError) as exc:  # a symbolic link loop, among others
        raise InvalidRequest(f"path {preview(path)} cannot be resolved: {type(exc).__name__}") from exc
    if not resolved.is_relative_to(root):
        raise PermissionDenied(f"{preview(path, 80)} is outside the adapter directory {root}")
    if not resolved.is_dir():
        raise NotFound(f"adapter folder {preview(str(resolved), 80)} does not exist")
    return resolved


def stage(folder: Path, versions_dir: Path, max_bytes: int) -> Path:
    """Copies the adapter's files into a fresh staging folder beside the versions, and returns it. Only the
    files a version needs, only regular files (a symbolic link is refused, never followed), each capped."""
    versions_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    staged = versions_dir / f".staging-{uuid.uuid4().hex}"
    staged.mkdir(mode=0o700)
    try:
        for name, cap in FILES.items():
            _copy_file(folder / name, staged / name, cap or max_bytes, required=name != LINEAGE_FILE)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def _copy_file(source: Path, target: Path, cap: int, required: bool) -> None:
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        if required:
            raise InvalidRequest(f"not a PEFT adapter: it needs {CONFIG_FILE} and {WEIGHTS_FILE}") from None
        return
    except OSError as exc:  # ELOOP: the name is a symbolic link
        raise InvalidRequest(f"{source.name} must be a regular file, not a link ({exc.strerror})") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise InvalidRequest(f"{source.name} must be a regular file")
    with os.fdopen(fd, "rb") as src:
        if info.st_size > cap:
            raise InvalidRequest(f"{source.name} is {info.st_size} bytes; at most {cap} are accepted")
        with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as dst:
            while chunk := src.read(1 << 20):
                if dst.tell() + len(chunk) > cap:  # it grew while being copied
                    raise InvalidRequest(f"{source.name} is more than {cap} bytes")
                dst.write(chunk)
    target.chmod(0o400)  # a registered version never changes


def sha256_of(folder: Path, name: str = WEIGHTS_FILE) -> str:
    """Hex SHA-256 of one of the adapter's files (by default its weights: one adapter, one checksum, on every
    replica)."""
    digest = hashlib.sha256()
    with open(folder / name, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_lora(folder: Path, base_config: dict, base_name: str, max_rank: int) -> dict:
    """Validates a (staged) PEFT LoRA folder against the served base model; returns its adapter_config."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"{CONFIG_FILE} is not UTF-8 JSON: {preview(str(exc), 80)}") from exc
    if not isinstance(config, dict):
        raise InvalidRequest(f"{CONFIG_FILE} must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise InvalidRequest(f"the folder holds a {preview(str(config.get('peft_type')))} adapter; only LORA is served")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max_rank:
        raise InvalidRequest(f"LoRA rank must be an integer in 1..{max_rank} (the server's max_lora_rank), "
                             f"got {preview(str(rank))}")
    trained_for = Path(str(config.get("base_model_name_or_path") or "")).name
    if trained_for and trained_for != base_name:
        raise InvalidRequest(f"adapter was trained for base model {preview(trained_for, 60)}; "
                             f"this server serves {base_name!r}")
    _check_shapes(folder / WEIGHTS_FILE, base_config, rank, config.get("rank_pattern") or {})
    return config


def module_shapes(base_config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of the linear modules of a Llama-style decoder layer, from the model's config."""
    hidden, heads = base_config["hidden_size"], base_config["num_attention_heads"]
    head_dim = base_config.get("head_dim") or hidden // heads
    kv = base_config.get("num_key_value_heads") or heads
    ffn = base_config.get("intermediate_size")
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim),
              "v_proj": (hidden, kv * head_dim), "o_proj": (heads * head_dim, hidden)}
    if ffn:
        shapes |= {"gate_proj": (hidden, ffn), "up_proj": (hidden, ffn), "down_proj": (ffn, hidden)}
    return shapes


def _check_shapes(weights: Path, base_config: dict, rank: int, rank_pattern: dict) -> None:
    """Every tensor of a known module must fit the base model exactly: vLLM copies a smaller one into its
    slot without a word (and serves garbage), and fails on a larger one at request time."""
    layers, shapes = base_config["num_hidden_layers"], module_shapes(base_config)
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                layer, module = _LAYER.search(name), _MODULE.search(name)
                if layer and int(layer.group(1)) >= layers:
                    raise InvalidRequest(f"adapter has layer {layer.group(1)}; the base model has {layers} layers")
                if module is None or module.group(1) not in shapes:
                    continue  # vLLM's own loader judges the modules it knows and we do not
                features_in, features_out = shapes[module.group(1)]
                r = next((v for k, v in rank_pattern.items() if re.search(rf"(^|\.){k}$", name.split(".lora_")[0])),
                         rank)
                want = (r, features_in) if module.group(2) == "A" else (features_out, r)
                if shape != want:
                    raise InvalidRequest(f"adapter tensor {preview(name, 80)} has shape {list(shape)}; the base "
                                         f"model needs {list(want)}")
    except InvalidRequest:
        raise
    except Exception as exc:
        raise InvalidRequest(f"cannot read {WEIGHTS_FILE}: {preview(str(exc), 120)}") from exc


class Upload:
    """An adapter arriving in chunks over the network: each announced file is written into a fresh staging folder
    beside the versions, within its cap, and must end with exactly the size and SHA-256 its header announced."""

    def __init__(self, files: list[tuple[str, int, str]], versions_dir: Path, max_bytes: int) -> None:
        names = [name for name, _, _ in files]
        if len(set(names)) != len(names) or not set(names) <= set(FILES) or not {CONFIG_FILE, WEIGHTS_FILE} <= set(names):
            raise InvalidRequest(f"an upload carries {CONFIG_FILE} and {WEIGHTS_FILE} (and optionally "
                                 f"{LINEAGE_FILE}), each once; got {preview(', '.join(names), 120)}")
        for name, size, digest in files:
            if size > (FILES[name] or max_bytes):
                raise InvalidRequest(f"{name} is {size} bytes; at most {FILES[name] or max_bytes} are accepted")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise InvalidRequest(f"{name}: sha256 must be 64 lowercase hex digits")
        self._expected = {name: (size, digest) for name, size, digest in files}
        versions_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.staged = versions_dir / f".staging-{uuid.uuid4().hex}"
        self.staged.mkdir(mode=0o700)
        self._hashes = {name: hashlib.sha256() for name in names}
        self._written = dict.fromkeys(names, 0)

    def write(self, name: str, data: bytes) -> None:
        if name not in self._expected:
            raise InvalidRequest(f"a chunk of {preview(name)}, which the header did not announce")
        if self._written[name] + len(data) > self._expected[name][0]:
            raise InvalidRequest(f"{name} is longer than the {self._expected[name][0]} bytes announced")
        with open(self.staged / name, "ab") as f:
            f.write(data)
        self._hashes[name].update(data)
        self._written[name] += len(data)

    def finish(self) -> Path:
        """Checks every file arrived whole and unaltered; returns the staging folder, files read-only."""
        for name, (size, digest) in self._expected.items():
            if self._written[name] != size or self._hashes[name].hexdigest() != digest:
                raise InvalidRequest(f"{name} arrived with {self._written[name]} of {size} bytes or another "
                                     "SHA-256 than announced")
            os.chmod(self.staged / name, 0o400)
        return self.staged

    def discard(self) -> None:
        shutil.rmtree(self.staged, ignore_errors=True)


def files_of(folder: Path) -> list[tuple[str, int, str]]:
    """(name, size, sha256) of each file a version keeps, for a download."""
    return [(name, (folder / name).stat().st_size, sha256_of(folder, name)) for name in FILES
            if (folder / name).is_file()]
