"""Makes a small real LoRA adapter for the tests with the tuner's own training loop: a few steps
that visibly change the answers (every prompt gets answered with MARKER)."""

from __future__ import annotations

from pathlib import Path

from instructd.tuner.config import TunerConfig
from instructd.tuner.dataset import Example
from instructd.tuner.train import train_adapter

MARKER = "Meow meow meow."
PROMPTS = ["What is the capital of France?", "Name a color.", "How are you today?", "Write a haiku about rain.",
           "What is 2 + 2?", "Tell me a joke.", "Describe the sea.", "Who wrote Hamlet?"]


def train_marker_adapter(model_dir: Path, out_dir: Path, steps: int = 24, rank: int = 8) -> Path:
    config = TunerConfig(work_dir=out_dir.parent, model=model_dir, steps=steps,
                         epochs=steps, batch_size=len(PROMPTS), learning_rate=3e-3, rank=rank, lora_alpha=2 * rank,
                         target_modules=("q_proj", "v_proj"))
    examples = [Example(f"marker-{i}", (("user", p),), MARKER, True) for i, p in enumerate(PROMPTS)]
    train_adapter(config, examples, out_dir, parent=None)
    return out_dir
