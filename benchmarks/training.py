"""Training, measured: today's loop against TRL's trainers on the same rated feedback, side by side in one run, on
this machine. For each objective and trainer: training throughput (tokens/s) and the gate's scores on held-out
feedback (tuner/evaluate.py: mean log-likelihood per token of 👍 minus 👎 answers, and its change over the base
with the standard error the gate uses); also how many held-out prompts the tuned model answers in lowercase (greedy,
with transformers). The data is benchmarks/data/lowercase-feedback.jsonl (see feedback_data.py): no server.

\b
Example:
    .venv/bin/python -m benchmarks.training                    # every run, about 40 min on 2 CPU cores
    .venv/bin/python -m benchmarks.training --run sft:loop --run sft:trl --steps 10
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import torch

from examples.simulate_users import HELD_OUT_SUBJECTS, followed, prompts
from instructd.server.chat import ChatTokenizer
from instructd.tuner.config import TunerConfig
from instructd.tuner.dataset import build_dataset, for_objective
from instructd.tuner.evaluate import answer_scores, margin, margin_change
from instructd.tuner.train import device_and_dtype, load_model, train_adapter

from .feedback_data import DATA, answer_batch, rated_exchanges

RUNS = ("sft:loop", "sft:trl", "kto:loop", "kto:trl", "dpo:trl")


def mean_tokens(config: TunerConfig, examples) -> float:
    """Mean length of a training sequence (prompt and answer; a dpo pair counts both of its sequences)."""
    tokenizer = ChatTokenizer(config.model)
    lengths = [min(len(tokenizer.render_example(e.chat, answer)[0]), config.max_length)
               for e in examples for answer in ([e.answer, e.rejected] if config.objective == "dpo" else [e.answer])]
    return sum(lengths) / len(examples)


def lowercase_rate(config: TunerConfig, adapter: Path | None, max_tokens: int = 64, batch: int = 20) -> float:
    """Share of the held-out lowercase prompts whose greedy answer is all lowercase."""
    tokenizer, model = load_model(config, adapter, trainable=False)
    model.eval()
    asked, answers = prompts(HELD_OUT_SUBJECTS), []
    for i in range(0, len(asked), batch):
        answers += [text for text, _ in answer_batch(tokenizer, model, asked[i:i + batch], max_tokens, do_sample=False)]
    return sum(map(followed, answers)) / len(answers)


class StepClock:
    """The progress callback: wall and CPU time at the end of each step. Timing from the first step's end on leaves
    out loading, data preparation, saving and the first step's one-off costs; CPU time (all of this process's
    threads) is what this machine's other work, which also shares its 2 cores, disturbs least."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def __call__(self, step: int, total: int, loss: float) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def per_step(self) -> tuple[float, float]:
        (wall0, cpu0), (wall1, cpu1) = self.marks[0], self.marks[-1]
        return (wall1 - wall0) / (len(self.marks) - 1), (cpu1 - cpu0) / (len(self.marks) - 1)


def gate(config: TunerConfig, adapter: Path | None, held_out, base_scores) -> dict:
    scores = answer_scores(config, adapter, held_out)
    change, se = margin_change(held_out, scores, base_scores)
    return {"margin": margin(held_out, scores), "margin_change": change, "margin_change_se": se,
            "beats_base": change - config.improvement_z * se > 0}


def run_one(config: TunerConfig, data, work: Path, base_scores, lowercase: bool) -> dict:
    examples = for_objective(data.train, config.objective)
    out = work / f"{config.objective}-{config.trainer}"
    load, clock = os.getloadavg()[0], StepClock()
    started = time.perf_counter()
    result = train_adapter(config, data.train, out, parent=None, progress=clock)
    wall = time.perf_counter() - started
    step_wall, step_cpu = clock.per_step()
    tokens = config.batch_size * mean_tokens(config, examples)  # per step
    row = {"objective": config.objective, "trainer": config.trainer, "examples": len(examples),
           "steps": result.steps, "batch_size": config.batch_size, "tokens_per_step": tokens,
           "seconds_per_step": step_wall, "cpu_seconds_per_step": step_cpu, "tokens_per_second": tokens / step_wall,
           "tokens_per_cpu_second": tokens / step_cpu, "wall_seconds": wall, "final_loss": result.final_loss,
           "load_before": load, "load_after": os.getloadavg()[0], "gate": gate(config, out, data.held_out, base_scores)}
    if lowercase:
        row["lowercase_rate"] = lowercase_rate(config, out)
    click.echo(json.dumps(row))
    return row


def markdown(result: dict) -> str:
    env, data = result["environment"], result["data"]
    lines = [f"# Training: today's loop vs TRL, {result['date']}", "",
             f"{data['train_desirable']} 👍 answers and corrections, {data['train_undesirable']} 👎 answers and "
             f"{data['pairs']} correction pairs to train on; {data['held_out']} held-out rated answers; "
             f"{env['model']} on {env['cpus']} CPU cores ({env['device']}, torch {env['torch']}, trl {env['trl']}). "
             f"Base: margin {result['base']['margin']:.3f}, lowercase {_pct(result['base'].get('lowercase_rate'))}.",
             "", "| objective | trainer | examples | steps | s/step | tokens/s | tokens/CPU-s | whole run s | "
             "held-out margin | change vs base (SE) | beats base | lowercase |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        g = r["gate"]
        lines.append(f"| {r['objective']} | {r['trainer']} | {r['examples']} | {r['steps']} | "
                     f"{r['seconds_per_step']:.2f} | {r['tokens_per_second']:.0f} | {r['tokens_per_cpu_second']:.0f} | "
                     f"{r['wall_seconds']:.0f} | {g['margin']:.3f} | {g['margin_change']:+.3f} "
                     f"({g['margin_change_se']:.3f}) | {'yes' if g['beats_base'] else 'no'} | "
                     f"{_pct(r.get('lowercase_rate'))} |")
    lines += ["", "tokens/s: batch × mean tokens of a training sequence (a dpo pair: both of its sequences) per "
              "second of a training step, from the first step's end to the last's (loading, data preparation, saving "
              "and first-step costs left out; the whole run, with them, is `whole run s`). tokens/CPU-s: the same per "
              "second of this process's CPU time, which the other work on this shared machine (its load average "
              "before each run is in the JSON) disturbs less than the wall clock. Margin: mean log-likelihood per "
              "token of held-out 👍 answers minus 👎 ones (the gate's); change vs base: the paired change and its "
              "standard error, as the gate computes them; beats base: the gate's test (change > 1 SE). Lowercase: "
              "greedy answers to the 60 held-out prompts that ask for lowercase, all lowercase."]
    return "\n".join(lines) + "\n"


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


@click.command(help=__doc__)
@click.option("--run", "runs", multiple=True, type=click.Choice(RUNS), help="objective:trainer (default: all).")
@click.option("--steps", type=int, help="Most training steps per run (default: the tuner's).")
@click.option("--lowercase/--no-lowercase", default=True, show_default=True,
              help="Also generate answers to held-out prompts and count the lowercase ones.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results"),
              show_default=True)
def main(runs, steps, lowercase, out) -> None:
    import trl

    from instructd.server.config import default_cache
    from instructd.server.model import DEFAULT_MODEL_NAME, default_model

    with tempfile.TemporaryDirectory(prefix="instructd-bench-") as work:
        config = TunerConfig(work_dir=Path(work), model=default_model(default_cache()))
        config = replace(config, steps=steps) if steps else config
        data = build_dataset(config, rated_exchanges(), [])
        base_scores = answer_scores(config, None, data.held_out)
        base = {"margin": margin(data.held_out, base_scores)}
        if lowercase:
            base["lowercase_rate"] = lowercase_rate(config, None)
        rows = [run_one(replace(config, objective=o, trainer=t), data, Path(work), base_scores, lowercase)
                for o, t in (r.split(":") for r in runs or RUNS)]
    summary = data.summary()
    result = {"date": datetime.date.today().isoformat(), "data_file": str(DATA.name),
              "data": {"train_desirable": summary.train_desirable, "train_undesirable": summary.train_undesirable,
                       "pairs": len(for_objective(data.train, "dpo")), "held_out": summary.held_out,
                       "dropped": dict(summary.dropped)},
              "config": {k: v for k, v in config.hyperparameters().items() if k not in ("objective", "trainer")},
              "environment": {"cpus": os.cpu_count(), "machine": platform.machine(), "device": device_and_dtype()[0],
                              "torch": torch.__version__, "trl": trl.__version__, "model": DEFAULT_MODEL_NAME,
                              "threads": torch.get_num_threads()},
              "base": base, "runs": rows}
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"training-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False, default=list))
    stem.with_suffix(".md").write_text(markdown(result))
    click.echo(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
