"""Rehearsal (self-distillation): the base model answers plain instructions of the tuner's own (rehearsal.json)
through the first target, as users get it, and one good answer per prompt is trained on beside users' feedback, as a
👍 answer. Feedback teaches what users rated; these anchor everything else (plain answers, instruction types no one
rated) to the base's own good answers, so a candidate learns the one without unlearning the other. None of the
prompts is in the gate's suite: the gate still judges plain answers on prompts never trained on."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from instructd.client import ApiError, AsyncClient

from .checks import answered, repetition
from .config import TunerConfig
from .dataset import Example, for_objective

log = logging.getLogger("instructd.tuner")
PROMPTS = Path(__file__).with_name("rehearsal.json")
DECODINGS = ((0.0, 0), (0.7, 1), (0.7, 2))
"""(temperature, seed) of the answers asked for each prompt, in order; the first good one is kept. The base loops
often: on 2 CPU cores, its greedy answers to 10 of these 40 prompts did not loop, and with two samples more all 40
prompts got one that did not."""


def rehearsal_prompts(count: int) -> list[str]:
    return json.loads(PROMPTS.read_text())["prompts"][:count]


def rehearsal_examples(config: TunerConfig) -> list[Example]:
    """One desirable example per prompt of the first `config.rehearsal` whose base answer does not loop (no exchange
    id: they are nobody's rating). An answer gets `config.max_length` tokens, the training window: one that ends by
    then is learnt with its ending; one that does not fills the window with the prompt, so training cuts it before
    its end (train.encode) and it never teaches stopping mid-answer. The base's answers never change, so they are
    asked once and kept in the tuner's directory."""
    prompts = rehearsal_prompts(config.rehearsal)
    if not prompts:
        return []
    cache = config.work_dir / "rehearsal-answers.json"
    key = f"{config.model}|{config.max_length}|{DECODINGS}"
    kept = json.loads(cache.read_text()) if cache.exists() else {}
    answers = kept.get(key, {})
    missing = [p for p in prompts if p not in answers]
    asked = {p: a for p, a in zip(missing, asyncio.run(_best_answers(config, missing))) if a is not None} \
        if missing else {}
    if asked:  # kept only when something new was answered
        answers.update(asked)
        config.work_dir.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(".partial")
        partial.write_text(json.dumps({key: answers}, indent=1))
        os.replace(partial, cache)
    return [Example("", (("user", p),), answers[p], True) for p in prompts if answers.get(p)]


def with_rehearsal(config: TunerConfig, train: list[Example], rehearsal: list[Example]) -> list[Example]:
    """`train` and then `rehearsal`, each rehearsal example once or, in turn, as often as it takes for them to make up
    `config.rehearsal_share` of what the objective learns from (sft: not the 👎 answers in `train`)."""
    if not rehearsal:
        return list(train)
    learnt = len(for_objective(train, config.objective))
    wanted = round(config.rehearsal_share / (1 - config.rehearsal_share) * learnt)
    return list(train) + [rehearsal[i % len(rehearsal)] for i in range(max(len(rehearsal), wanted))]


def keep(text: str, max_repetition: float) -> bool:
    """An answer worth rehearsing: a real answer that does not repeat itself."""
    return answered(text) and repetition(text) <= max_repetition


async def _best_answers(config: TunerConfig, prompts: list[str]) -> list[str | None]:
    """Per prompt, the first answer (in DECODINGS' order) worth rehearsing, "" if none is, or None if the server did
    not answer (asked again next run; this one trains without it)."""
    async with AsyncClient(config.primary) as client:
        async def best(prompt: str) -> str | None:
            try:
                for temperature, seed in DECODINGS:
                    answer = await client.generate(prompt, adapter="base", temperature=temperature, seed=seed,
                                                   max_tokens=config.max_length)
                    if keep(answer.text, config.max_repetition):
                        return answer.text
            except ApiError as error:
                log.warning("rehearsal prompt %r not answered: %s", prompt, error)
                return None
            return ""

        return list(await asyncio.gather(*(best(p) for p in prompts)))
