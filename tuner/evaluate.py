"""The evaluation gate: a candidate must beat the serving adapter on held-out feedback and must not
regress the fixed instruction-following suite (answers generated through the server, i.e. vLLM)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from instructd.client import AsyncClient

from .checks import passes
from .config import TunerConfig
from .dataset import Example
from .train import answer_logprobs, device_and_dtype, encode, load_model

SUITE = Path(__file__).with_name("suite.json")


@dataclass
class Verdict:
    passed: bool
    reason: str
    candidate_margin: float
    current_margin: float
    candidate_history: float
    current_history: float
    candidate_suite: float
    current_suite: float
    suite_by_check: dict

    def scores(self) -> dict:
        return asdict(self)


@torch.no_grad()
def feedback_margins(config: TunerConfig, adapter: Path | None, *example_sets: list[Example]) -> list[float]:
    """For each set: mean per-token log-likelihood of its 👍 answers minus that of its 👎 answers (higher is
    better; 0 for an empty set). The model is loaded once for all sets."""
    if not any(example_sets):
        return [0.0] * len(example_sets)
    device, _ = device_and_dtype()
    tokenizer, model = load_model(config, adapter, trainable=False)
    model.eval()
    margins = []
    for examples in example_sets:
        means: dict[bool, list[float]] = {True: [], False: []}
        for example in examples:
            batch = [encode(tokenizer, example, config.max_length)]
            total, count = answer_logprobs(model, batch, device)[0].tolist()
            means[example.desirable].append(total / max(count, 1))
        avg = {k: sum(v) / len(v) if v else 0.0 for k, v in means.items()}
        margins.append(avg[True] - avg[False] if examples else 0.0)
    return margins


async def suite_scores(target: str, version: int, items: list[dict] | None = None) -> dict[str, float]:
    """Pass rate per check type of `version` (0: base) on the suite, greedy, through the server."""
    items = items if items is not None else json.loads(SUITE.read_text())["items"]
    async with AsyncClient(target, app_id="instructd-tuner") as client:
        answers = await asyncio.gather(*(client.generate(i["prompt"], adapter=version or "base", temperature=0,
                                                         max_tokens=96) for i in items))
    by_check: dict[str, list[bool]] = {}
    for item, answer in zip(items, answers):
        by_check.setdefault(item["check"]["type"], []).append(passes(answer.text, item["check"]))
    return {k: sum(v) / len(v) for k, v in sorted(by_check.items())}


def overall(by_check: dict[str, float]) -> float:
    """Mean pass rate over check types: each type weighs the same, however many prompts it has."""
    return sum(by_check.values()) / len(by_check) if by_check else 0.0


def judge(config: TunerConfig, candidate: tuple[int, Path], current: tuple[int, Path | None],
          held_out: list[Example], history: list[Example]) -> Verdict:
    """Compares the candidate with the serving adapter (or base): on new held-out feedback it must do
    better; on earlier held-out feedback, which poisoned new ratings cannot rewrite, not worse; and
    on the instruction suite not worse."""
    cand_margin, cand_history = feedback_margins(config, candidate[1], held_out, history)
    curr_margin, curr_history = feedback_margins(config, current[1], held_out, history)
    cand_suite = asyncio.run(suite_scores(config.target, candidate[0]))
    curr_suite = asyncio.run(suite_scores(config.target, current[0]))
    by_check = {k: {"candidate": cand_suite[k], "current": curr_suite.get(k, 0.0)} for k in cand_suite}
    drop = overall(curr_suite) - overall(cand_suite)
    passed = False
    if not held_out:
        reason = "no held-out feedback to judge the candidate on"
    elif cand_margin <= curr_margin:
        reason = f"held-out feedback margin {cand_margin:.4f} does not beat the serving {curr_margin:.4f}"
    elif curr_history - cand_history > config.history_tolerance:
        reason = (f"contradicts earlier feedback: its margin there falls from {curr_history:.4f} to "
                  f"{cand_history:.4f} (tolerance {config.history_tolerance})")
    elif drop > config.gate_tolerance:
        reason = f"instruction suite falls by {drop:.3f} (tolerance {config.gate_tolerance})"
    else:
        passed, reason = True, "beats the serving adapter on held-out feedback; no suite regression"
    return Verdict(passed, reason, cand_margin, curr_margin, cand_history, curr_history, overall(cand_suite),
                   overall(curr_suite), by_check)
