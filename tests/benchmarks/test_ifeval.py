"""The benchmark's judge: IFEval's checkers on composed prompts, and corrections a user could make by hand."""

from __future__ import annotations

import random

import pytest

from benchmarks.ifeval import CORRECTIONS, Judge
from benchmarks.loop import RATED, UNRATED


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge()


def test_prompts_carry_the_checkers_descriptions_and_arguments(judge):
    prompt = judge.compose("Describe a lake.", ("startend:end_checker", "change_case:english_lowercase"),
                           random.Random(3))
    assert prompt.text.startswith("Describe a lake. ")
    (end_type, end_args), _ = prompt.instructions
    assert end_type == "startend:end_checker" and end_args["end_phrase"] in prompt.text
    assert prompt == judge.compose("Describe a lake.", prompt.types, random.Random(3))  # deterministic


def test_strict_judging(judge):
    prompt = judge.compose("Describe a lake.", ("change_case:english_lowercase", "punctuation:no_comma"),
                           random.Random(0))
    assert judge.followed(prompt, "the lake is calm and the birds sing all morning") == [True, True]
    assert judge.followed(prompt, "The lake is calm, and the birds sing all morning") == [False, False]
    assert judge.followed(prompt, "") == [False, False]


@pytest.mark.parametrize("instruction_id", sorted(CORRECTIONS))
def test_corrections_follow_the_instruction(judge, instruction_id):
    answer = "Lakes are calm, deep and cold.\nMany birds live there, and fish too.\n\nPeople swim in summer."
    for seed in range(5):
        prompt = judge.compose("Describe a lake.", (instruction_id,), random.Random(seed))
        fixed = judge.correct(prompt, answer)
        if fixed is not None:  # a correction is offered only when the checker accepts it
            assert all(judge.followed(prompt, fixed))
    assert any(judge.correct(judge.compose("Describe a lake.", (instruction_id,), random.Random(s)), answer)
               for s in range(5))


def test_types_that_cannot_be_judged_offline_are_reported(judge):
    missing = judge.unavailable()
    assert all(isinstance(why, str) and why for why in missing.values())
    assert not set(RATED + UNRATED) & set(missing)  # the benchmark's types all run here
    assert set(RATED).isdisjoint(UNRATED)
