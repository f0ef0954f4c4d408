"""Training with TRL's trainers (SFT, KTO, DPO) on `datasets` built from the examples. Under `accelerate launch`
the same code trains on several GPUs (DeepSpeed or FSDP through an accelerate config file) with no code of ours:

    accelerate launch --multi_gpu --num_processes 4 -m instructd.tuner.trl_train JOB.json OUT_DIR

where JOB.json is what `launch` writes; the tuner does all of it when its `launcher` is set.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

from instructd.server.adapters import CONFIG_FILE, LINEAGE_FILE, WEIGHTS_FILE
from instructd.server.chat import ChatTokenizer

from .config import TunerConfig
from .dataset import Example
from .train import (Progress, TrainResult, cpu_has_bf16, device_and_dtype, kto_weights, lora_config,
                    planned_steps, train_adapter, write_lineage)

PROGRESS = "instructd-progress "  # how a launched rank 0 reports each step on its stdout


def server_rendering_tokenizer(model: Path):
    """The model's tokenizer with apply_chat_template rendering as the server renders prompts (server/chat.py).
    TRL's trainers tokenize conversations through it, so text in a message is never a control token in training
    either; whatever would render otherwise (a template, tools, rendering to text) is refused, never ignored."""
    chat, tokenizer = ChatTokenizer(model), AutoTokenizer.from_pretrained(model)

    def apply_chat_template(conversation, tokenize=True, return_dict=False, add_generation_prompt=False, **options):
        used = sorted(k for k, v in options.items() if v)
        if not tokenize or used:
            raise ValueError(f"renders token ids as the server does, and nothing else (asked: {used or 'text'})")
        ids = chat.render(conversation, add_generation_prompt=add_generation_prompt)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if return_dict else ids

    tokenizer.apply_chat_template = apply_chat_template  # this instance only; ChatTokenizer keeps its own
    return tokenizer


def records(examples: list[Example], objective: str) -> list[dict]:
    """TRL's conversational formats: prompt-completion (sft), unpaired with a label (kto), preference pairs (dpo)."""
    if objective == "dpo":
        return [{"prompt": e.chat, "chosen": _turn(e.answer), "rejected": _turn(e.rejected)} for e in examples]
    if objective == "kto":
        return [{"prompt": e.chat, "completion": _turn(e.answer), "label": e.desirable} for e in examples]
    return [{"prompt": e.chat, "completion": _turn(e.answer)} for e in examples]


def _turn(answer: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": answer}]


def make_trainer(config: TunerConfig, examples: list[Example], parent: Path | None, scratch: Path,
                 callbacks: list | None = None):
    """TRL's trainer for config.objective, set up as the loop trains: AdamW (torch's weight decay), a constant rate,
    gradients clipped at 1, fp32 weights with bf16 compute on a CPU that has it; no gradient checkpointing (TRL's
    default), which costs time and saves memory only a large model needs."""
    device, dtype = device_and_dtype()
    # Left where it loads (the CPU): the trainer places it, on each process's own GPU under a launcher.
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)
    if parent is not None:  # continue from the serving adapter, which is also KTO's and DPO's reference then
        model = PeftModel.from_pretrained(model, parent, is_trainable=True)
    data = Dataset.from_list(records(examples, config.objective))
    if config.objective == "kto":  # its sampler is sequential (the KL pairs are neighbours): shuffle once here
        data = data.shuffle(seed=config.seed)
    common = dict(output_dir=str(scratch), per_device_train_batch_size=config.batch_size,
                  max_steps=config.steps,
                  learning_rate=config.learning_rate, lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0,
                  bf16=_bf16(device), use_cpu=device == "cpu", gradient_checkpointing=False, seed=config.seed,
                  max_length=config.max_length, save_strategy="no", report_to=[], logging_steps=1,
                  ddp_find_unused_parameters=False)
    if config.objective == "sft":
        trainer_class, args = SFTTrainer, SFTConfig(**common, completion_only_loss=True)
    elif config.objective == "kto":
        w_good, w_bad = kto_weights(examples)
        trainer_class, args = KTOTrainer, KTOConfig(**common, beta=config.kto_beta, desirable_weight=w_good,
                                                    undesirable_weight=w_bad)
    else:
        trainer_class, args = DPOTrainer, DPOConfig(**common, beta=config.dpo_beta)
    # Each step takes a batch in every process: known once the arguments have set up the processes (on CPU, a
    # PartialState made before them sees one).
    args.max_steps = planned_steps(config, len(examples), args.world_size)
    return trainer_class(model=model, args=args, train_dataset=data,
                         processing_class=server_rendering_tokenizer(config.model),
                         peft_config=None if parent is not None else lora_config(config), callbacks=callbacks)


def train_with_trl(config: TunerConfig, examples: list[Example], out_dir: Path, parent: Path | None,
                   progress: Progress | None = None, metadata: dict | None = None) -> TrainResult:
    """Trains with TRL's trainer for config.objective; the main process saves the PEFT folder and its lineage."""
    with tempfile.TemporaryDirectory(prefix="instructd-trl-") as scratch:
        losses = _Losses(progress)
        trainer = make_trainer(config, examples, parent, Path(scratch), [losses])
        started = time.perf_counter()
        trainer.train()
        steps = trainer.state.global_step
        result = TrainResult(losses.last, (time.perf_counter() - started) / steps, len(examples),
                             device_and_dtype()[0], steps, "trl")
        # save_model gathers sharded weights (DeepSpeed, FSDP) and writes on the main process only. The folder keeps
        # the adapter alone: not the reference copy TRL makes of a parent (its "ref" subfolder), nor the tokenizer.
        trainer.save_model(scratch)
        if trainer.accelerator.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.move(Path(scratch) / name, out_dir / name)
            write_lineage(out_dir, config, result, examples, metadata)
    return result


def _bf16(device: str) -> bool:
    """bf16 compute: on GPU, and on a CPU that has it (the loop's cpu_autocast; without it bf16 is slower there)."""
    return device != "cpu" or cpu_has_bf16()


class _Losses(TrainerCallback):
    """Keeps the last step's loss (the mean over processes) and reports each step from the main process."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress, self.last = progress, math.nan

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last = float(logs["loss"])
            if self.progress and state.is_world_process_zero:
                self.progress(state.global_step, state.max_steps, self.last)


def launch(config: TunerConfig, examples: list[Example], out_dir: Path, parent: Path | None,
           progress: Progress | None = None, metadata: dict | None = None) -> TrainResult:
    """Trains in processes that config.launcher starts (e.g. `accelerate launch --multi_gpu --num_processes 4`),
    each running this module on a job file; rank 0 reports its steps on stdout and writes the folder."""
    job = out_dir.with_name(out_dir.name + ".job.json")
    fields = {**config.hyperparameters(), "trainer": "trl", "work_dir": str(config.work_dir), "model": str(config.model)}
    job.write_text(json.dumps({"config": fields, "examples": [asdict(e) for e in examples],
                               "parent": str(parent) if parent else None, "metadata": metadata or {}}))
    command = [*shlex.split(config.launcher), "-m", "instructd.tuner.trl_train", str(job), str(out_dir)]
    # The launcher as installed beside this Python (a virtual environment's bin need not be on PATH).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as proc:
            for line in proc.stdout:
                if line.startswith(PROGRESS) and progress:
                    progress(*json.loads(line[len(PROGRESS):]))
                elif not line.startswith(PROGRESS):
                    sys.stdout.write(line)
        if proc.returncode:
            raise RuntimeError(f"training under {config.launcher!r} failed with exit status {proc.returncode}")
    finally:
        job.unlink(missing_ok=True)
    return TrainResult(**json.loads((out_dir / LINEAGE_FILE).read_text())["result"])


def _report(step: int, total: int, loss: float) -> None:
    print(PROGRESS + json.dumps([step, total, loss]), flush=True)


def main(argv: list[str]) -> None:
    """One launched process: the job's training, as `launch` wrote it."""
    job_path, out_dir = (Path(a) for a in argv)
    job = json.loads(job_path.read_text())
    config = TunerConfig(**{**job["config"], "target_modules": tuple(job["config"]["target_modules"])})
    examples = [Example(**{**e, "messages": tuple(tuple(m) for m in e["messages"])}) for e in job["examples"]]
    train_adapter(config, examples, out_dir, Path(job["parent"]) if job["parent"] else None, progress=_report,
                  metadata=job["metadata"])


if __name__ == "__main__":
    main(sys.argv[1:])
