"""Makes small real LoRA adapters with peft for the tests: a few steps that visibly change the answers."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

MARKER = "Meow meow meow."
PROMPTS = ["What is the capital of France?", "Name a color.", "How are you today?", "Write a haiku about rain.",
           "What is 2 + 2?", "Tell me a joke.", "Describe the sea.", "Who wrote Hamlet?"]


def train_marker_adapter(model_dir: Path, out_dir: Path, steps: int = 24, rank: int = 8) -> Path:
    """Teaches the model to answer every prompt with MARKER; saves a PEFT folder at out_dir."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    batch = [_example(tokenizer, p) for p in PROMPTS]
    width = max(len(ids) for ids, _ in batch)
    pad = tokenizer.eos_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    return out_dir


def _example(tokenizer, prompt: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt+answer, with labels masking the prompt (loss on the answer only)."""
    messages = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": MARKER}], tokenize=False)
    head_ids = tokenizer.encode(head, add_special_tokens=False)
    full_ids = tokenizer.encode(full, add_special_tokens=False)
    return full_ids, [-100] * len(head_ids) + full_ids[len(head_ids):]
