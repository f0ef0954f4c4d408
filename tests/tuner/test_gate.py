"""The gate's statistics on earlier feedback: a paired comparison, so a small but consistent shift
against what users said is caught, while noise of the same size is not."""

from __future__ import annotations

import random

from instructd.tuner.config import TunerConfig
from instructd.tuner.dataset import Example
from instructd.tuner.evaluate import contradicts, margin, margin_change
from instructd.tuner.train import planned_steps


def _examples(n: int) -> list[Example]:
    return [Example(f"x{i}", (("user", "q"),), "a", desirable=i % 2 == 0) for i in range(n)]


def test_margin_is_up_minus_down():
    examples = _examples(4)
    assert margin(examples, [-1.0, -3.0, -2.0, -4.0]) == -1.5 - -3.5


def test_a_small_consistent_shift_against_the_ratings_is_significant():
    rng = random.Random(0)
    examples = _examples(40)
    current = [rng.uniform(-3, -1) for _ in examples]  # answers differ a lot from each other...
    # ...but the candidate lowers every 👍 answer and raises every 👎 one a little (poisoned training).
    poisoned = [c + (-0.02 if e.desirable else 0.02) + rng.gauss(0, 0.005) for e, c in zip(examples, current)]
    change, se = margin_change(examples, poisoned, current)
    assert change < 0 and change + 2 * se < 0
    # The unpaired margins move by as little as the per-answer spread would hide.
    assert abs(margin(examples, poisoned) - margin(examples, current)) < 0.05


def test_noise_alone_is_not_significant():
    rng = random.Random(1)
    examples = _examples(40)
    current = [rng.uniform(-3, -1) for _ in examples]
    candidate = [c + rng.gauss(0, 0.02) for c in current]
    change, se = margin_change(examples, candidate, current)
    assert change + 2 * se >= 0


def test_training_steps_follow_the_data_within_the_cap(tmp_path):
    config = TunerConfig(work_dir=tmp_path, model=tmp_path, steps=60, epochs=3, batch_size=4)
    assert planned_steps(config, 8) == 6      # three passes over a handful: no memorising
    assert planned_steps(config, 400) == 60   # plenty of data: the cap
    assert planned_steps(config, 0) == 1


def test_what_contradicts_earlier_feedback(tmp_path):
    config = TunerConfig(work_dir=tmp_path, model=tmp_path, history_tolerance=0.05, history_z=2)
    assert contradicts(-0.15, 0.07, config)       # a large fall, even if noisy (a poisoned run seen in CI)
    assert contradicts(-0.02, 0.005, config)      # a small fall, but clearly not noise
    assert not contradicts(-0.02, 0.02, config)   # small and noisy
    assert not contradicts(0.10, 0.05, config)    # honest feedback widened the margin


def test_a_lone_answer_on_one_side_still_counts_toward_the_error():
    rng = random.Random(2)
    examples = [Example("up", (("user", "q"),), "a", desirable=True)] + _examples(17)[1::2]  # 1 👍, 8 👎
    current = [rng.uniform(-3, -1) for _ in examples]
    candidate = [c + rng.gauss(0, 0.05) for c in current]
    se = margin_change(examples, candidate, current)[1]
    down_only = margin_change(examples[1:], candidate[1:], current[1:])[1]
    assert se > 2 * down_only  # the single 👍 answer's difference is as uncertain as any one 👎 answer's
    assert margin_change(examples[:2], candidate[:2], current[:2])[1] == float("inf")  # nothing to estimate from
