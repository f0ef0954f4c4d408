"""The evaluation gate: a candidate must beat the serving adapter on held-out feedback (or, retrained on all that
adapter learnt, be no worse there) and must not be clearly worse on the fixed instruction-following suite (both
versions answer it through the server, i.e. vLLM, as users get it)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from pathlib import Path
from typing import NamedTuple

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


def keeps_ratings(verdict: pb.Verdict) -> bool:
    """Whether a run's ratings stay for the next one: all but those of a promoted candidate and those that contradict
    earlier feedback (suspected poisoning: set aside for good, honest ones among them too, since they cannot be told
    apart). Too little evidence or a suite regression is no reason to distrust them: the next run has more."""
    return verdict.decision not in (pb.GATE_PASSED, pb.GATE_CONTRADICTS_HISTORY)


def contradicts(change: float, se: float, config: TunerConfig) -> bool:
    """Whether a fall of the margin on earlier feedback rejects a candidate: too large, or clearly not noise."""
    return change < -config.history_tolerance or change + config.history_z * se < 0


def new_feedback_fails(change: float, se: float, held_out: list[Example], config: TunerConfig,
                       retrains_adapter: bool) -> int:
    """The test on new held-out feedback: the decision that rejects a candidate whose 👍/👎 margin there changed by
    `change` (standard error `se`) against the serving version's, or 0 where it passes.

    Against the base, or an adapter it was not retrained from, the candidate must be better by `improvement_z`
    standard errors: a run that barely moved the model is not promoted. A candidate trained from the base on all
    that the serving adapter learnt and the new ratings (`retrains_adapter`) holds that version's evidence and more,
    and scores much as it does on answers that version gave: it need only not be clearly worse (by `history_z`
    standard errors, as on earlier feedback); the suite and the live canary judge it further. Demanding a gain there
    froze learning after the first promotion: in the closed loop (loop-2026-12-04-seed0.md) the candidates of cycles
    2 and 3, on 219 and 304 examples, matched v1 (margin change +0.007 and -0.007, standard errors 0.025 and 0.015)
    and were rejected, so rated types stayed at v1's."""
    if not held_out or not math.isfinite(se):  # nothing to judge by, either way
        return pb.GATE_TOO_LITTLE_EVIDENCE
    if retrains_adapter:
        return pb.GATE_WORSE_ON_NEW_FEEDBACK if change + config.history_z * se < 0 else 0
    return pb.GATE_TOO_LITTLE_EVIDENCE if change - config.improvement_z * se <= 0 else 0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


DECODINGS = (0.0, 0.7)
"""Every suite prompt is answered greedily and sampled at the server's default temperature (with a fixed seed per
prompt, the same for both versions): what users see either way, and loops show under both."""


class Version(NamedTuple):
    """A version the gate compares, as the first target knows it."""

    number: int
    """Its version number there (0: the base model)."""
    folder: Path | None
    """Its adapter folder in the tuner's directory (None: the base model)."""
    sha256: str = ""
    """Its weights' checksum (empty: the base model): what its kept suite results are filed under."""


def suite_results(config: TunerConfig, versions: list[Version]) -> list[list[tuple[str, bool]]]:
    """(check type, passed) for each suite prompt and decoding, in a fixed order, of each version. A version's
    results are kept in the tuner's directory under its checksum, so a candidate's results, asked for when it was
    judged, are its results as the serving version in the next run: only versions asked for the first time (or under
    another suite or base model) are put to the server, all at once (one engine batch rather than one version
    after the other)."""
    suite = SUITE.read_bytes()
    fingerprint = hashlib.sha256(suite + (config.model / "config.json").read_bytes()).hexdigest()
    files = [config.work_dir / "suite-results" / f"{v.sha256 or 'base'}.json" for v in versions]
    kept = [_kept_results(f, fingerprint) for f in files]
    missing = [i for i, results in enumerate(kept) if results is None]
    if not missing:
        return kept
    asked = asyncio.run(suite_passes(config.primary, [versions[i].number for i in missing], json.loads(suite)))
    for i, results in zip(missing, asked):
        kept[i] = results
        _keep_results(files[i], fingerprint, results)
    return kept


async def suite_passes(target: str, versions: list[int], suite: dict) -> list[list[tuple[str, bool]]]:
    """Each version's (check type, passed) for each suite prompt and decoding, through the server at each item's
    answer length (version 0: the base)."""
    at_once = asyncio.Semaphore(64)  # well within the server's admission limit (256 in flight), leaving users room

    async def ask(client: AsyncClient, version: int, seed: int, item: dict, temperature: float) -> tuple[str, bool]:
        async with at_once:
            answer = await client.generate(item["prompt"], adapter=version or "base", temperature=temperature,
                                           seed=seed, max_tokens=item.get("max_tokens", 96))
        return item["check"]["type"], passes(answer.text, item["check"])

    async with AsyncClient(target) as client:
        asked = [[ask(client, version, seed, item, t) for seed, item in enumerate(suite["items"]) for t in DECODINGS]
                 for version in versions]
        answered = await asyncio.gather(*(a for each in asked for a in each))
    per_version = len(answered) // max(len(versions), 1)
    return [list(answered[i * per_version:(i + 1) * per_version]) for i in range(len(versions))]


def _kept_results(path: Path, fingerprint: str) -> list[tuple[str, bool]] | None:
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return [(check, passed) for check, passed in kept["results"]] if kept.get("fingerprint") == fingerprint else None


def _keep_results(path: Path, fingerprint: str, results: list[tuple[str, bool]]) -> None:
    """Written whole or not at all: a tuner killed while writing leaves no half file to be read as results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps({"fingerprint": fingerprint, "results": results}))
    partial.replace(path)


def pass_rates(results: list[tuple[str, bool]]) -> dict[str, float]:
    by_check: dict[str, list[bool]] = {}
    for check, passed in results:
        by_check.setdefault(check, []).append(passed)
    return {k: sum(v) / len(v) for k, v in sorted(by_check.items())}


def overall(by_check: dict[str, float]) -> float:
    """Mean pass rate over check types: each type weighs the same, however many prompts it has."""
    return sum(by_check.values()) / len(by_check) if by_check else 0.0


def paired_loss(candidate: list[bool], current: list[bool]) -> tuple[int, int, float]:
    """The no-harm test on the suite: McNemar's exact test, one-sided. Of the answer pairs (same prompt, same
    decoding) on which the versions disagree, the candidate loses `losses` (the serving version passed, it failed)
    and wins `wins`; p is the chance of losing at least that many if neither were worse: a binomial(losses + wins,
    1/2) tail. Answers both pass or both fail say nothing about which is worse, and are left out.

    Power: a candidate 10 points worse (say it loses 15% of the pairs and wins 5%: 20% disagree) is caught at a 5%
    level with probability 0.91 on 180 pairs and 0.93 on 200 (exact, binomial over binomial; see test_gate); the
    suite's 100 prompts, each answered two ways, give 200. Pairs of the same prompt are not independent, so the true
    power is somewhat lower; with fewer disagreements (a 10-point loss that is all losses) it is above 0.99."""
    losses = sum(c < p for c, p in zip(candidate, current))
    wins = sum(c > p for c, p in zip(candidate, current))
    n = losses + wins
    return losses, wins, sum(math.comb(n, k) for k in range(losses, n + 1)) / 2 ** n


def judge(config: TunerConfig, candidate: Version, current: Version, held_out: list[Example],
          history: list[Example], retrains_current: bool = False) -> pb.Verdict:
    """Compares the candidate with the serving adapter (or base), in this order: on earlier held-out feedback, which
    poisoned new ratings cannot rewrite, not significantly worse; on new held-out feedback better, or, when it
    `retrains_current`, not clearly worse (new_feedback_fails); and on the instruction suite (answered by the first
    target) not clearly worse, pair by pair (paired_loss). The first test failed is the verdict's decision; a
    candidate that fails on feedback is not put to the suite, which would cost the server 400 answers (its suite
    fields stay empty)."""
    examples = held_out + history
    cand_scores = answer_scores(config, candidate.folder, examples)
    curr_scores = answer_scores(config, current.folder, examples)
    new, old = slice(0, len(held_out)), slice(len(held_out), None)
    verdict = pb.Verdict(candidate_margin=margin(held_out, cand_scores[new]),
                         current_margin=margin(held_out, curr_scores[new]),
                         candidate_history=margin(history, cand_scores[old]),
                         current_history=margin(history, curr_scores[old]))
    change, change_se = margin_change(held_out, cand_scores[new], curr_scores[new])
    history_change, history_se = margin_change(history, cand_scores[old], curr_scores[old])
    for name, se in (("margin_change_se", change_se), ("history_change_se", history_se)):
        if math.isfinite(se):  # unset: there was too little to estimate it from
            setattr(verdict, name, se)
    if contradicts(history_change, history_se, config):  # first: a poisoned run may also look too weak
        verdict.decision = pb.GATE_CONTRADICTS_HISTORY
        verdict.reason = (f"contradicts earlier feedback: its margin there falls from {verdict.current_history:.4f} "
                          f"to {verdict.candidate_history:.4f}, {-history_change / max(history_se, 1e-12):.1f} "
                          f"standard errors (limits: {config.history_tolerance} or {config.history_z} standard errors)")
    elif decision := new_feedback_fails(change, change_se, held_out, config,
                                        retrains_current and current.folder is not None):
        verdict.decision = decision
        verdict.reason = (f"clearly worse on new held-out feedback: margin {verdict.candidate_margin:.4f} against the "
                          f"serving {verdict.current_margin:.4f}, more than {config.history_z} standard errors "
                          f"({change_se:.4f}) below" if decision == pb.GATE_WORSE_ON_NEW_FEEDBACK else
                          f"held-out feedback margin {verdict.candidate_margin:.4f} does not beat the serving "
                          f"{verdict.current_margin:.4f} by {config.improvement_z} standard error(s) ({change_se:.4f})")
    else:
        gained = change - config.improvement_z * change_se > 0
        _judge_on_suite(config, candidate, current, verdict, "beats the serving adapter on held-out feedback" if gained
                        else "no worse on held-out feedback than the serving adapter it retrains")
    verdict.passed = verdict.decision == pb.GATE_PASSED
    return verdict


def _judge_on_suite(config: TunerConfig, candidate: Version, current: Version, verdict: pb.Verdict,
                    on_feedback: str) -> None:
    """The last test, on a candidate that passed on feedback (`on_feedback` says how): fills in `verdict`'s suite
    fields, decision and reason."""
    cand_results, curr_results = suite_results(config, [candidate, current])
    losses, wins, harm_p = paired_loss([r[1] for r in cand_results], [r[1] for r in curr_results])
    cand_suite, curr_suite = pass_rates(cand_results), pass_rates(curr_results)
    verdict.candidate_suite, verdict.current_suite = overall(cand_suite), overall(curr_suite)
    for check, rate in cand_suite.items():
        verdict.suite_by_check[check].CopyFrom(pb.SuiteScore(candidate=rate, current=curr_suite.get(check, 0.0)))
    verdict.suite_losses, verdict.suite_wins, verdict.suite_loss_p = losses, wins, harm_p
    if harm_p < config.harm_alpha:
        verdict.decision = pb.GATE_SUITE_REGRESSION
        verdict.reason = (f"worse on the instruction suite: of the answer pairs that differ, it loses {losses} and "
                          f"wins {wins} (McNemar's exact test, one-sided p = {harm_p:.3g} < {config.harm_alpha})")
    else:
        verdict.decision = pb.GATE_PASSED
        verdict.reason = (f"{on_feedback}; no clear loss on the instruction suite "
                          f"(loses {losses}, wins {wins} answer pairs, p = {harm_p:.3g})")
