"""Trains a LoRA adapter with peft on the served base model: supervised instruction tuning (loss on the
answer only), KTO (desirable/undesirable answers, no pairs) or DPO (a 👎 answer and its correction as a pair).

Two trainers, picked per device by `TunerConfig.trainer`: the short loop below (sft and kto; the base model is
KTO's reference, the same weights with the adapter off) and TRL's trainers (trl_train.py: sft, kto and dpo, which
`accelerate launch` scales to several GPUs). On this CPU the loop took 1.5x (sft) to 2.3x (kto) less time per
step, and both trainers' adapters passed the gate; see benchmarks/results/training-*.md.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from instructd.server.adapters import LINEAGE_FILE
from instructd.server.chat import ChatTokenizer
from instructd.server.engine import cpu_has_bf16

from .config import TunerConfig
from .dataset import Example, for_objective

PADDING_SLACK = 1.25
"""A batch's examples run padded together while the padding adds at most a quarter to their tokens."""
Progress = Callable[[int, int, float], None]  # (step, total_steps, loss)


@dataclass
class TrainResult:
    final_loss: float
    seconds_per_step: float
    examples: int
    device: str
    steps: int
    trainer: str = "loop"
    """Which trainer ran: 'loop' or 'trl'."""


def device_and_dtype() -> tuple[str, torch.dtype]:
    """GPU: bf16 weights. CPU: fp32 weights (bf16 weights round away small LoRA updates)."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def cpu_autocast(device: str):
    """On a CPU with bf16 support, compute in bf16 while the weights stay fp32: about twice as fast."""
    enabled = device == "cpu" and cpu_has_bf16()
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def planned_steps(config: TunerConfig, examples: int, processes: int = 1) -> int:
    """`epochs` passes over the examples, at most `steps`, at least one (each step takes a batch per process)."""
    return max(1, min(config.steps, math.ceil(config.epochs * examples / (config.batch_size * processes))))


def choose_trainer(config: TunerConfig, device: str) -> str:
    """'loop' or 'trl'. Auto: TRL on GPU (where accelerate scales it; the loop runs on one device only), for dpo
    (the loop has none) and under a launcher; the loop on CPU, where TRL took 1.5x to 2.3x longer per step."""
    if config.trainer != "auto":
        return config.trainer
    return "trl" if device != "cpu" or config.objective == "dpo" or config.launcher else "loop"


def lora_config(config: TunerConfig):
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, target_modules=list(config.target_modules),
                      lora_dropout=0.0, task_type="CAUSAL_LM")


def load_model(config: TunerConfig, adapter: Path | None, trainable: bool):
    """The base model with an adapter on top: `adapter`'s weights, or a fresh LoRA when None."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    device, dtype = device_and_dtype()
    tokenizer = ChatTokenizer(config.model)
    base = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype).to(device)
    if adapter is not None:
        model = PeftModel.from_pretrained(base, adapter, is_trainable=trainable)
    else:
        model = get_peft_model(base, lora_config(config))
    return tokenizer, model


def encode(tokenizer: ChatTokenizer, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """Prompt+answer token ids and labels that mask the prompt, at most max_length of them: a long answer
    loses its end (the instruction must stay in view); a prompt longer than half the window loses its start.
    Rendered exactly as the server renders prompts, so text in a message is never a control token here either."""
    ids, answer_start = tokenizer.render_example(example.chat, example.answer)
    labels = [-100] * answer_start + ids[answer_start:]
    start = answer_start - min(answer_start, max_length // 2) if len(ids) > max_length else 0
    return ids[start:start + max_length], labels[start:start + max_length]


def answer_logprobs(model, batch: list[tuple[list[int], list[int]]], device: str) -> torch.Tensor:
    """Sum of log-probabilities of each example's answer tokens, and their count: shape (n, 2), in batch order.
    Examples of alike length run together: padded to a long one, short ones would cost its length each (a batch of
    one 512-token and three 120-token examples: 11-13 s per training step on 2 CPU cores padded, 4.5 s grouped)."""
    groups, group = [], []
    for i in sorted(range(len(batch)), key=lambda i: len(batch[i][0])):
        width = len(batch[i][0])  # the longest so far: the group's padded width with it
        if group and width * (len(group) + 1) > PADDING_SLACK * (width + sum(len(batch[j][0]) for j in group)):
            groups.append(group)
            group = []
        group.append(i)
    groups.append(group)
    sums = torch.cat([_padded_logprobs(model, [batch[i] for i in g], device) for g in groups])
    return sums[torch.argsort(torch.tensor([i for g in groups for i in g], device=sums.device))]


def _padded_logprobs(model, batch: list[tuple[list[int], list[int]]], device: str) -> torch.Tensor:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in batch], device=device)
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch], device=device)
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch], device=device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    # The softmax over the vocabulary only where an answer token is predicted (not prompt, not padding).
    logp = F.log_softmax(logits[keep].float(), -1).gather(1, targets[keep].unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(len(batch), device=device).index_add(0, keep.nonzero()[:, 0], logp)
    return torch.stack([sums, keep.sum(-1).float()], dim=-1)


def train_adapter(config: TunerConfig, examples: list[Example], out_dir: Path, parent: Path | None,
                  progress: Progress | None = None, metadata: dict | None = None) -> TrainResult:
    """Trains on what the objective learns from, with the trainer `choose_trainer` picks (or in processes of their
    own when config.launcher is set), then saves the PEFT folder at out_dir with instructd_training.json beside."""
    examples = for_objective(examples, config.objective)
    if not examples:
        raise ValueError("no training examples")
    if config.launcher:
        from .trl_train import launch

        return launch(config, examples, out_dir, parent, progress, metadata)
    device, _ = device_and_dtype()
    if choose_trainer(config, device) == "trl":
        from .trl_train import train_with_trl

        return train_with_trl(config, examples, out_dir, parent, progress, metadata)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    tokenizer, model = load_model(config, parent, trainable=True)
    encoded = [(encode(tokenizer, e, config.max_length), e.desirable) for e in examples]
    w_good, w_bad = kto_weights(examples)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    order, steps = list(range(len(encoded))), planned_steps(config, len(encoded))
    model.train()
    started, loss_value = time.perf_counter(), float("nan")
    bar = tqdm(range(steps), desc=f"training ({config.objective}, {device})", unit="step")
    for step in bar:
        if step * config.batch_size % len(order) < config.batch_size:
            random.shuffle(order)
        picks = [encoded[order[(step * config.batch_size + i) % len(order)]] for i in range(config.batch_size)]
        batch, good = [p[0] for p in picks], torch.tensor([p[1] for p in picks], device=device)
        with cpu_autocast(device):
            if config.objective == "sft":
                sums = answer_logprobs(model, batch, device)
                # Each answer weighs the same, however long: a short answer's ending counts as much as a long one's.
                loss = -(sums[:, 0] / sums[:, 1].clamp(min=1)).mean()
            else:
                loss = _kto_loss(model, batch, good, config.kto_beta, w_good, w_bad, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if progress:
            progress(step + 1, steps, loss_value)
    result = TrainResult(loss_value, (time.perf_counter() - started) / steps, len(encoded), device, steps)
    model.save_pretrained(out_dir)
    write_lineage(out_dir, config, result, examples, metadata)
    return result


def kto_weights(examples: list[Example]) -> tuple[float, float]:
    """Weights of desirable and undesirable examples in KTO, so that both sides count alike however unbalanced."""
    good = sum(e.desirable for e in examples)
    return len(examples) / (2 * max(good, 1)), len(examples) / (2 * max(len(examples) - good, 1))


def write_lineage(out_dir: Path, config: TunerConfig, result: TrainResult, examples: list[Example],
                  metadata: dict | None) -> None:
    """instructd_training.json beside the weights: how the adapter was made and from which exchanges."""
    record = {"hyperparameters": config.hyperparameters(), "result": asdict(result),
              "exchange_ids": sorted({e.exchange_id for e in examples if e.exchange_id}), **(metadata or {})}
    (out_dir / LINEAGE_FILE).write_text(json.dumps(record, indent=1, default=list))


def _kto_loss(model, batch, good: torch.Tensor, beta: float, w_good: float, w_bad: float, device: str):
    """KTO: push the policy/reference log-ratio of desirable answers above a KL baseline, undesirable below."""
    policy = answer_logprobs(model, batch, device)[:, 0]
    with torch.no_grad(), model.disable_adapter():
        reference = answer_logprobs(model, batch, device)[:, 0]
    ratio = policy - reference
    baseline = ratio.detach().mean().clamp(min=0)  # batch estimate of KL(policy || reference)
    wanted = w_good * (1 - torch.sigmoid(beta * (ratio - baseline)))
    unwanted = w_bad * (1 - torch.sigmoid(beta * (baseline - ratio)))
    return torch.where(good, wanted, unwanted).mean()
