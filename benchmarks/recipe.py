"""Training recipes, side by side on the same ratings: the loop benchmark's simulated users rate the base's answers,
the tuner's own data selection turns the ratings into training examples, and each recipe trains a candidate from
the base on them with the tuner's own code; then the base and every candidate answer the loop benchmark's held-out
prompts through one server, greedily, side by side in the same engine batches. Every difference (from the base,
and between recipes) is paired, with its 95% interval. This is the evidence for the tuner's default recipe (rehearsal, tuner/rehearsal.py).

\b
Example:
    .venv/bin/python -m benchmarks.recipe            # 480 ratings, 2 recipes: about 45 min on 2 CPU cores
    .venv/bin/python -m benchmarks.recipe -r default -r lr-3e-4 -r kto   # 3 recipes: about 50 min
    .venv/bin/python -m benchmarks.recipe --quick    # smoke run (60 ratings, few prompts, short training)
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import click

from instructd.client.local import LocalServer
from instructd.client.tuning import TuningClient
from instructd.server.config import ENV_API_KEY, default_cache
from instructd.server.model import default_model
from instructd.tuner.config import TunerConfig
from instructd.tuner.dataset import build_dataset, for_objective
from instructd.tuner.rehearsal import rehearsal_examples, with_rehearsal
from instructd.tuner.train import train_adapter

from .ifeval import Judge
from .loop import QUICK, Loop, LoopConfig, _environment, instruction_types
from .report import GROUPS, paired_interval

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RECIPES = {"no-rehearsal": ("feedback alone", {"rehearsal": 0}),
           "default": ("feedback + rehearsal (default)", {}),
           "lr-3e-4": ("feedback + rehearsal, learning rate 3e-4", {"learning_rate": 3e-4}),
           "lr-2e-3": ("feedback + rehearsal, learning rate 2e-3", {"learning_rate": 2e-3}),
           "lr-4e-3": ("feedback + rehearsal, learning rate 4e-3", {"learning_rate": 4e-3}),
           "kto": ("feedback + rehearsal, kto", {"objective": "kto"}),
           "all-linear": ("feedback + rehearsal, LoRA on attention and MLP", {"target_modules": ALL_LINEAR}),
           "all-linear-r16": ("feedback + rehearsal, LoRA on attention and MLP, rank 16",
                              {"target_modules": ALL_LINEAR, "rank": 16, "lora_alpha": 32}),
           "rehearsal-two-thirds": ("feedback + rehearsal repeated to two thirds of the examples, 150 steps",
                                    {"rehearsal_share": 2 / 3, "steps": 150}),
           "lr-4e-3-rehearsal-two-thirds": ("feedback + rehearsal repeated to two thirds, 150 steps, learning rate 4e-3",
                                            {"rehearsal_share": 2 / 3, "steps": 150, "learning_rate": 4e-3})}
"""Key -> (name in the results, TunerConfig fields that differ from the tuner's defaults)."""


def run_recipes(loop_config: LoopConfig, traffic: int, steps: int | None, recipes: dict[str, dict], out_dir: Path,
                work_dir: Path) -> Path:
    """Train each of `recipes` (name -> TunerConfig fields), in order, then measure them all beside the base; later
    ones are compared to the first as well as to the base."""
    judge = Judge()
    _, rated, unrated = instruction_types(judge)
    server = LocalServer(work_dir / "data", work_dir / "server.log", "--generate-per-second", "0",
                         "--feedback-per-second", "0")
    result: dict = {"config": {**asdict(loop_config), "traffic": traffic, "recipes": recipes},
                    "environment": _environment(), "recipes": {}}
    with server:
        loop = Loop(loop_config, server, judge, rated, unrated)
        result["traffic"] = asyncio.run(loop.traffic("users rate the base", traffic))
        with server.client() as admin:
            tuner_key = admin.create_key("recipe-tuner", "tuner")[1]
        os.environ[ENV_API_KEY] = tuner_key  # this process is the tuner now: rehearsal asks the server with its key
        base_config = TunerConfig(work_dir=work_dir / "tuner", model=default_model(default_cache()),
                                  targets=(server.target,), **({"steps": steps} if steps else {}))
        with TuningClient(server.target, api_key=tuner_key) as tuning:
            data = build_dataset(base_config, list(tuning.export()), [])
        result["data"] = {"train": len(for_objective(data.train, base_config.objective)),
                          "dropped": dict(data.dropped)}
        for i, (name, fields) in enumerate(recipes.items(), 1):
            config = replace(base_config, **fields)
            rehearsal = rehearsal_examples(config)
            out = server.adapter_dir / f"recipe-{i}"  # where the server registers adapters from
            trained = train_adapter(config, with_rehearsal(config, data.train, rehearsal), out, parent=None)
            with server.client() as admin:
                version = admin.register(str(out), metadata={"recipe": name}).version
            result["recipes"][name] = {"fields": fields, "rehearsal_examples": len(rehearsal),
                                       "train": asdict(trained), "version": version}
        # The base and every recipe side by side, in the same engine batches: their pairs share its noise.
        versions = (0, *(r["version"] for r in result["recipes"].values()))
        measured = dict(zip(["base", *recipes], asyncio.run(loop.measure("base and recipes", versions))))
    result["measure"] = {name: {k: m[k] for k in ("rated", "unrated", "plain", "judged")}
                         for name, m in measured.items()}
    result["change"] = _changes(measured)
    return _write(result, out_dir)


def _changes(measured: dict) -> dict:
    """Each recipe minus the base, and each later recipe minus the first, per group, paired by prompt."""
    names = [n for n in measured if n != "base"]
    pairs = [(n, "base") for n in names] + [(n, names[0]) for n in names[1:]]
    return {f"{a} − {b}": {g: paired_interval(measured[b]["judged"][g], measured[a]["judged"][g]) for g in GROUPS}
            for a, b in pairs}


def _write(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    quick = "-quick" if result["config"]["quick"] else ""
    stem = out_dir / f"recipe-{datetime.date.today().isoformat()}{quick}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    fmt = lambda c: f"{c['difference']:+.1%} ({c['low']:+.1%} to {c['high']:+.1%})"  # noqa: E731
    env, data = result["environment"], result["data"]
    lines = [f"# Training recipes side by side: {env['date'][:10]}", "",
             f"{result['config']['traffic']} ratings of the base's answers by the loop benchmark's simulated users "
             f"({result['traffic']['up']} 👍, {result['traffic']['down']} 👎, {result['traffic']['corrections']} "
             f"corrections) became {data['train']} training examples (dropped: {data['dropped'] or 'none'}); each "
             f"recipe trained a candidate from the base on them. SmolLM2-135M-Instruct, {env['cpus']} CPU cores.", "",
             "| version | rated types | unrated types | plain |", "|---|---|---|---|",
             *[f"| {n} | {m['rated']:.1%} | {m['unrated']:.1%} | {m['plain']:.1%} |"
               for n, m in result["measure"].items()], "",
             "| difference (95% interval) | rated types | unrated types | plain |", "|---|---|---|---|",
             *[f"| {pair} | " + " | ".join(fmt(c[g]) for g in GROUPS) + " |" for pair, c in result["change"].items()],
             "", "Held-out prompts never sent as traffic, answered greedily through the gRPC API, judged as in "
             "benchmarks/loop.py; intervals: paired percentile bootstrap over prompts (benchmarks/report.py).", "",
             *[f"- {n}: {r['rehearsal_examples']} rehearsal examples, {r['train']['examples']} examples in all, "
               f"{r['train']['steps']} steps, final loss {r['train']['final_loss']:.3f}"
               for n, r in result["recipes"].items()]]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md")


@click.command(help=__doc__)
@click.option("--quick", is_flag=True, help="Smoke run: 60 ratings, few held-out prompts, 10 training steps.")
@click.option("--traffic", type=int, help="Rated exchanges (default 480: the loop benchmark's first two cycles).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results"),
              show_default=True, help="Where recipe-<date>.json and .md are written.")
@click.option("--seed", default=0, show_default=True)
@click.option("-r", "--recipe", "keys", multiple=True, type=click.Choice(list(RECIPES)),
              default=("no-rehearsal", "default"), show_default=True,
              help="A recipe to train, in order; the first is the one the others are compared to.")
def main(quick, traffic, out, seed, keys) -> None:
    loop_config = replace(QUICK if quick else LoopConfig(), seed=seed)
    recipes = dict(RECIPES[key] for key in keys)
    work = Path(tempfile.mkdtemp(prefix="instructd-recipe-"))
    try:
        path = run_recipes(loop_config, traffic or (60 if quick else 480), 10 if quick else None, recipes, out, work)
    except BaseException:
        click.echo(f"benchmark failed; the service's logs are kept in {work}", err=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    click.echo(path.read_text())


if __name__ == "__main__":
    main()
