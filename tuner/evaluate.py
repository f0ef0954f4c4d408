"""The evaluation gate: a candidate must beat the serving adapter on held-out feedback and must not
regress the fixed instruction-following suite (answers generated through the server, i.e. vLLM)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import torch

from instructd.client import AsyncClient
from instructd.v1 import instructd_pb2 as pb

from .checks import passes
from .config import TunerConfig
from .dataset import Example
from .train import answer_logprobs, device_and_dtype, encode, load_model

SUITE = Path(__file__).with_name("suite.json")


@torch.no_grad()
def answer_scores(config: TunerConfig, adapter: Path | None, examples: list[Example], batch: int = 8) -> list[float]:
    """Mean per-token log-likelihood of each example's answer under the base with `adapter` on top."""
    if not examples:
        return []
    device, _ = device_and_dtype()
    tokenizer, model = load_model(config, adapter, trainable=False)
    model.eval()
    encoded = [encode(tokenizer, e, config.max_length) for e in examples]
    scores = []
    for i in range(0, len(encoded), batch):
        sums = answer_logprobs(model, encoded[i:i + batch], device)
        scores += (sums[:, 0] / sums[:, 1].clamp(min=1)).tolist()
    return scores


def margin(examples: list[Example], scores: list[float]) -> float:
    """Mean score of the 👍 answers minus that of the 👎 answers (a missing side counts 0)."""
    up = [s for e, s in zip(examples, scores) if e.desirable]
    down = [s for e, s in zip(examples, scores) if not e.desirable]
    return _mean(up) - _mean(down)


def margin_change(examples: list[Example], candidate: list[float], current: list[float]) -> tuple[float, float]:
    """How much the candidate widens the 👍/👎 margin over the current model, and the standard error of that,
    from per-example differences (paired: each answer is scored by both; the variance is pooled over both
    sides, so a side with a single answer still counts). Infinite when there is too little to estimate it."""
    diffs = {good: [c - p for e, c, p in zip(examples, candidate, current) if e.desirable == good]
             for good in (True, False)}
    change = _mean(diffs[True]) - _mean(diffs[False])
    sides = [d for d in diffs.values() if d]
    freedom = sum(len(d) - 1 for d in sides)
    if freedom < 1:
        return change, math.inf
    pooled = sum((x - _mean(d)) ** 2 for d in sides for x in d) / freedom
    return change, math.sqrt(pooled * sum(1 / len(d) for d in sides))


def contradicts(change: float, se: float, config: TunerConfig) -> bool:
    """Whether a fall of the margin on earlier feedback rejects a candidate: too large, or clearly not noise."""
    return change < -config.history_tolerance or change + config.history_z * se < 0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


async def suite_scores(target: str, version: int, items: list[dict] | None = None) -> dict[str, float]:
    """Pass rate per check type of `version` (0: base) on the suite, greedy, through the server."""
    items = items if items is not None else json.loads(SUITE.read_text())["items"]
    async with AsyncClient(target) as client:
        answers = await asyncio.gather(*(client.generate(i["prompt"], adapter=version or "base", temperature=0,
                                                         max_tokens=i.get("max_tokens", 96)) for i in items))
    by_check: dict[str, list[bool]] = {}
    for item, answer in zip(items, answers):
        by_check.setdefault(item["check"]["type"], []).append(passes(answer.text, item["check"]))
    return {k: sum(v) / len(v) for k, v in sorted(by_check.items())}


def overall(by_check: dict[str, float]) -> float:
    """Mean pass rate over check types: each type weighs the same, however many prompts it has."""
    return sum(by_check.values()) / len(by_check) if by_check else 0.0


def judge(config: TunerConfig, candidate: tuple[int, Path], current: tuple[int, Path | None],
          held_out: list[Example], history: list[Example]) -> pb.Verdict:
    """Compares the candidate with the serving adapter (or base): on new held-out feedback it must do
    better; on earlier held-out feedback, which poisoned new ratings cannot rewrite, not significantly
    worse; and on the instruction suite (answered by the first target) not worse."""
    examples = held_out + history
    cand_scores = answer_scores(config, candidate[1], examples)
    curr_scores = answer_scores(config, current[1], examples)
    new, old = slice(0, len(held_out)), slice(len(held_out), None)
    cand_margin, curr_margin = margin(held_out, cand_scores[new]), margin(held_out, curr_scores[new])
    cand_history, curr_history = margin(history, cand_scores[old]), margin(history, curr_scores[old])
    change, change_se = margin_change(held_out, cand_scores[new], curr_scores[new])
    history_change, history_se = margin_change(history, cand_scores[old], curr_scores[old])
    cand_suite = asyncio.run(suite_scores(config.primary, candidate[0]))
    curr_suite = asyncio.run(suite_scores(config.primary, current[0]))
    drop = overall(curr_suite) - overall(cand_suite)
    passed = False
    if not held_out:
        reason = "no held-out feedback to judge the candidate on"
    elif change - config.improvement_z * change_se <= 0:
        reason = (f"held-out feedback margin {cand_margin:.4f} does not beat the serving {curr_margin:.4f} by "
                  f"{config.improvement_z} standard error(s) ({change_se:.4f})")
    elif contradicts(history_change, history_se, config):
        reason = (f"contradicts earlier feedback: its margin there falls from {curr_history:.4f} to "
                  f"{cand_history:.4f}, {-history_change / max(history_se, 1e-12):.1f} standard errors "
                  f"(limits: {config.history_tolerance} or {config.history_z} standard errors)")
    elif drop > config.gate_tolerance:
        reason = f"instruction suite falls by {drop:.3f} (tolerance {config.gate_tolerance})"
    else:
        passed, reason = True, "beats the serving adapter on held-out feedback; no suite regression"
    verdict = pb.Verdict(passed=passed, reason=reason, candidate_margin=cand_margin, current_margin=curr_margin,
                         candidate_history=cand_history, current_history=curr_history,
                         candidate_suite=overall(cand_suite), current_suite=overall(curr_suite),
                         suite_by_check={k: pb.SuiteScore(candidate=v, current=curr_suite.get(k, 0.0))
                                         for k, v in cand_suite.items()})
    for name, se in (("margin_change_se", change_se), ("history_change_se", history_se)):
        if math.isfinite(se):  # unset: there was too little to estimate it from
            setattr(verdict, name, se)
    return verdict
