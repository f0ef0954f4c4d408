"""Rehearsal: its prompts are the project's own and none is judged anywhere, a looping answer is never rehearsed, and
the base's answers are asked once per tuner directory (the real path runs in test_loop, whose candidate rehearses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from instructd.tuner.config import TunerConfig
from instructd.tuner.dataset import Example
from instructd.tuner.rehearsal import DECODINGS, keep, rehearsal_examples, rehearsal_prompts, with_rehearsal

ROOT = Path(__file__).parents[2]
JUDGED_OR_ASKED = ("tuner/suite.json", "benchmarks/tasks.py", "benchmarks/feedback_data.py",
                   "examples/simulate_users.py")


def test_rehearsal_prompts_are_never_judged_nor_asked_by_simulated_users():
    prompts = rehearsal_prompts(1000)
    assert len(prompts) == len(set(prompts)) == TunerConfig.rehearsal
    elsewhere = " ".join((ROOT / p).read_text() for p in JUDGED_OR_ASKED).lower()
    assert [p for p in prompts if p.lower() in elsewhere] == []


def test_only_real_answers_that_do_not_loop_are_rehearsed():
    good = ("A bicycle gear changes how far the wheel turns for each turn of the pedals. A small gear at the back "
            "makes pedalling easy on hills, and a large one lets you ride fast on flat roads.")
    looping = "The gear is a gear that turns. " * 12
    assert keep(good, 0.3)
    assert not keep(looping, 0.3) and not keep("Yes.", 0.3)


def test_the_bases_answers_are_asked_once_per_tuner_directory(tmp_path, model_dir):
    """A kept answer is used as it is (the target here answers nothing: asking it would fail); a prompt that got no
    good answer gives no example."""
    config = TunerConfig(work_dir=tmp_path, model=model_dir, targets=("127.0.0.1:9",), rehearsal=3)
    first, second, third = rehearsal_prompts(3)
    key = f"{config.model}|{config.max_length}|{DECODINGS}"
    (tmp_path / "rehearsal-answers.json").write_text(json.dumps({key: {first: "An answer.", second: "", third: "B."}}))
    examples = rehearsal_examples(config)
    assert [(e.messages, e.answer, e.desirable, e.exchange_id) for e in examples] == [
        ((("user", first),), "An answer.", True, ""), ((("user", third),), "B.", True, "")]
    assert rehearsal_examples(TunerConfig(work_dir=tmp_path, model=model_dir, rehearsal=0)) == []


def test_a_server_that_does_not_answer_leaves_those_prompts_for_the_next_run(tmp_path, model_dir):
    config = TunerConfig(work_dir=tmp_path, model=model_dir, targets=("127.0.0.1:9",), rehearsal=2)
    first, second = rehearsal_prompts(2)
    key = f"{config.model}|{config.max_length}|{DECODINGS}"
    (tmp_path / "rehearsal-answers.json").write_text(json.dumps({key: {first: "An answer."}}))
    assert [e.answer for e in rehearsal_examples(config)] == ["An answer."]
    assert json.loads((tmp_path / "rehearsal-answers.json").read_text()) == {key: {first: "An answer."}}


def _example(name: str, desirable: bool = True) -> Example:
    return Example(name, (("user", f"Prompt {name}."),), f"Answer {name}.", desirable)


def test_rehearsal_is_repeated_to_its_share_of_what_the_objective_learns_from(tmp_path):
    """sft learns from the three wanted answers, not the 👎 one: two thirds of rehearsal beside them is six
    examples, the two rehearsal answers in turn; kto learns from all four (eight); no share: each once."""
    train = [_example("a"), _example("b"), _example("c"), _example("d", desirable=False)]
    rehearsal = [_example("r1"), _example("r2")]

    def names(share: float, objective: str = "sft") -> list[str]:
        config = TunerConfig(work_dir=tmp_path, model=tmp_path, rehearsal_share=share, objective=objective)
        return [e.exchange_id for e in with_rehearsal(config, train, rehearsal)]

    assert names(2 / 3) == ["a", "b", "c", "d"] + ["r1", "r2"] * 3
    assert names(2 / 3, "kto") == ["a", "b", "c", "d"] + ["r1", "r2"] * 4
    assert names(0) == ["a", "b", "c", "d", "r1", "r2"]
    assert names(0.1) == ["a", "b", "c", "d", "r1", "r2"]  # never fewer than each once
    assert with_rehearsal(TunerConfig(work_dir=tmp_path, model=tmp_path, rehearsal_share=0.5), train, []) == train
    with pytest.raises(ValueError, match="rehearsal_share"):
        TunerConfig(work_dir=tmp_path, model=tmp_path, rehearsal_share=1)
