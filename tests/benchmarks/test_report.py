"""The benchmark's intervals: a paired bootstrap of the change on the same prompts covers the true change about 95%
of the time, and the same answers always give the same interval; a cycle left unmeasured is reported as such."""

from __future__ import annotations

import random

from benchmarks.report import paired_interval, write_report


RUN = {"run_id": 1, "outcome": "promoted", "candidate_version": 1, "examples": 40, "final_loss": 0.5, "reason": "ok"}


def _measure(rated: int) -> dict:
    """A measurement of 20 prompts per group, `rated` of the rated ones followed."""
    judged = {"rated": [i < rated for i in range(20)], "unrated": [False] * 20, "plain": [True] * 20}
    return {"judged": judged, **{g: sum(v) / 20 for g, v in judged.items()}}


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


def test_a_cycle_left_unmeasured_is_reported_as_such(tmp_path):
    result = {"config": {"cycles": 2, "traffic": 240, "seed": 3, "quick": False}, "unavailable_types": [],
              "environment": {"date": "2026-12-02T00:00:00", "cpus": 2}, "minutes": 50.0,
              "live_up_rate": [{"adapter_version": 0, "up": 2, "down": 8, "up_rate": 0.2},
                               {"adapter_version": 2, "up": 5, "down": 5, "up_rate": 0.5}],
              "cycles": [{"cycle": 0, "serving": 0, "measure": _measure(2)},
                         {"cycle": 1, "serving": 1, "run": RUN, "canary": None, "measure": None},
                         {"cycle": 2, "serving": 2, "run": {**RUN, "run_id": 2, "candidate_version": 2},
                          "canary": None, "measure": _measure(12)}]}
    path = write_report(result, tmp_path)
    assert path.name.endswith("-seed3.json")  # runs of two seeds on one day are kept apart
    report = path.with_suffix(".md").read_text()
    assert "| 1 | v1 | promoted | - | not measured | not measured | not measured |" in report
    assert "| 2 | v2 | promoted | - | 60.0% | 0.0% | 100.0% |" in report
    assert result["headline"]["change"]["rated"]["difference"] == 0.5  # the last cycle against the base
    assert result["headline"]["live_up_ratio"] == 2.5
    assert path.with_suffix(".png").stat().st_size > 10_000


def test_the_base_measured_beside_the_final_version_is_the_one_it_is_compared_with(tmp_path):
    result = {"config": {"cycles": 1, "traffic": 240, "seed": 0, "quick": False}, "unavailable_types": [],
              "environment": {"date": "2026-12-06T00:00:00", "cpus": 2}, "minutes": 40.0, "live_up_rate": [],
              "cycles": [{"cycle": 0, "serving": 0, "measure": _measure(2)},
                         {"cycle": 1, "serving": 1, "run": RUN, "canary": None, "measure": _measure(12),
                          "base_beside": _measure(4)}]}
    path = write_report(result, tmp_path)
    assert result["headline"]["change"]["rated"]["difference"] == (12 - 4) / 20  # against the base beside it
    assert result["headline"]["base_twice"]["rated"]["difference"] == (4 - 2) / 20  # the spread, no model changed
    assert "The base measured before the cycles against it" in path.with_suffix(".md").read_text()
