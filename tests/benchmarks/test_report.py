"""The benchmark's intervals: a paired bootstrap of the change on the same prompts covers the true change about 95%
of the time, and the same answers always give the same interval."""

from __future__ import annotations

import random

from benchmarks.report import paired_interval


def test_the_interval_is_paired_and_reproducible():
    before = [i % 3 == 0 for i in range(60)]
    assert paired_interval(before, before) == {"difference": 0.0, "low": 0.0, "high": 0.0, "prompts": 60}
    after = [not b if i < 30 else b for i, b in enumerate(before)]  # of the first 30: 20 gained, 10 lost
    change = paired_interval(before, after)
    assert change == paired_interval(before, after)
    assert change["difference"] == (20 - 10) / 60 and change["low"] < change["difference"] < change["high"]


def test_the_interval_covers_the_true_change_about_95_percent_of_the_time():
    rng, covered, trials = random.Random(7), 0, 120
    for _ in range(trials):  # each prompt: passed by the base with 0.4, by the tuned version with 0.55
        before = [rng.random() < 0.4 for _ in range(80)]
        after = [rng.random() < 0.55 for _ in range(80)]
        c = paired_interval(before, after, draws=1000)
        covered += c["low"] <= 0.15 <= c["high"]
    assert 0.88 <= covered / trials <= 0.995, covered
