"""The gate's statistics on earlier feedback: a paired comparison, so a small but consistent shift
against what users said is caught, while noise of the same size is not; which test decides a verdict, and which
ratings a rejected run leaves for the next; when the scheduler starts a run."""

from __future__ import annotations

import json
import math
import random

import pytest

from instructd.tuner import evaluate
from instructd.tuner.config import TunerConfig
from instructd.tuner.dataset import Example
from instructd.tuner.evaluate import contradicts, keeps_ratings, margin, margin_change
from instructd.tuner.scheduler import _due
from instructd.tuner.train import planned_steps
from instructd.v1 import instructd_pb2 as pb


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


def _judge(monkeypatch, tmp_path, held_out_change: float, history_change: float, suite_loss: int,
           serving: evaluate.Version = evaluate.Version(0, None), retrains: bool = False):
    """The gate's decision with scores and suite results given (no model, no server): each 👍 answer's score moves by
    +change/2 and each 👎 one's by -change/2 (with a little noise), on new and on earlier held-out feedback, against
    the `serving` version (the base unless given), which the candidate may have been retrained from."""
    rng = random.Random(3)
    new, old = _examples(20), _examples(20)
    base = [rng.uniform(-3, -1) for _ in new + old]
    moved = [s + (c if e.desirable else -c) / 2 + rng.gauss(0, 0.01)
             for e, s, c in zip(new + old, base, [held_out_change] * 20 + [history_change] * 20)]
    candidate = evaluate.Version(serving.number + 1, tmp_path / "candidate", "c" * 64)
    monkeypatch.setattr(evaluate, "answer_scores",
                        lambda config, adapter, examples: moved if adapter == candidate.folder else base)

    def suite(config, versions):  # 200 answer pairs; the candidate fails the first `suite_loss` of them
        return [[("answered", not (v.number and i < suite_loss) and i % 2 == 0) for i in range(200)] for v in versions]

    monkeypatch.setattr(evaluate, "suite_results", suite)
    config = TunerConfig(work_dir=tmp_path, model=tmp_path)
    return evaluate.judge(config, candidate, serving, new, old, retrains_current=retrains)


@pytest.mark.parametrize("held_out, history, suite_loss, decision, keeps", [
    (0.3, 0.0, 0, pb.GATE_PASSED, False),
    (0.3, 0.0, 8, pb.GATE_PASSED, False),                 # loses 4 of 100 passing answers, wins none: chance (p 0.06)
    (0.3, -0.3, 0, pb.GATE_CONTRADICTS_HISTORY, False),   # poisoned: the new feedback agrees with itself...
    (0.0, -0.3, 0, pb.GATE_CONTRADICTS_HISTORY, False),   # ...or not even that: suspected first, set aside
    (-0.01, 0.0, 0, pb.GATE_TOO_LITTLE_EVIDENCE, True),   # no better on new feedback: the ratings stay
    (0.3, 0.0, 10, pb.GATE_SUITE_REGRESSION, True),       # loses 5, wins none: clear (p 0.03)
])
def test_the_first_failed_test_decides_and_only_suspect_ratings_are_used_up(monkeypatch, tmp_path, held_out, history,
                                                                           suite_loss, decision, keeps):
    verdict = _judge(monkeypatch, tmp_path, held_out, history, suite_loss)
    assert (verdict.decision, verdict.passed, keeps_ratings(verdict)) == (decision, decision == pb.GATE_PASSED, keeps)
    put_to_the_suite = decision in (pb.GATE_PASSED, pb.GATE_SUITE_REGRESSION)  # failed on feedback: no 400 answers
    assert bool(verdict.suite_by_check) == put_to_the_suite and (verdict.suite_losses > 0) == (suite_loss > 0 and
                                                                                           put_to_the_suite)


@pytest.mark.parametrize("held_out, retrains, decision", [
    (-0.01, True, pb.GATE_PASSED),                  # about as good as the adapter it relearnt, with more evidence
    (-0.01, False, pb.GATE_TOO_LITTLE_EVIDENCE),    # trained on its own data, it has to beat the serving adapter
    (-0.05, True, pb.GATE_WORSE_ON_NEW_FEEDBACK),   # a small but consistent fall is clear: ratings stay
    (0.3, True, pb.GATE_PASSED),
])
def test_a_candidate_retrained_on_all_the_serving_adapter_learnt_need_only_be_no_worse(monkeypatch, tmp_path,
                                                                                       held_out, retrains, decision):
    serving = evaluate.Version(1, tmp_path / "serving", "s" * 64)
    verdict = _judge(monkeypatch, tmp_path, held_out, 0.0, 0, serving, retrains)
    assert (verdict.decision, keeps_ratings(verdict)) == (decision, decision != pb.GATE_PASSED), verdict.reason
    assert (verdict.decision == pb.GATE_PASSED) == bool(verdict.suite_by_check)
    if decision == pb.GATE_PASSED:  # the reason says which test on feedback it passed
        assert verdict.reason.startswith("beats" if held_out > 0 else "no worse"), verdict.reason


def test_against_the_base_a_retrained_candidate_still_has_to_beat_it(monkeypatch, tmp_path):
    """The base learnt nothing from ratings: a first adapter that does not beat it learnt too little to serve."""
    assert _judge(monkeypatch, tmp_path, -0.01, 0.0, 0, retrains=True).decision == pb.GATE_TOO_LITTLE_EVIDENCE


def test_too_few_held_out_answers_to_estimate_an_error_decide_nothing(tmp_path):
    config = TunerConfig(work_dir=tmp_path, model=tmp_path)
    for retrains in (True, False):
        assert evaluate.new_feedback_fails(0.5, math.inf, _examples(1), config, retrains) == pb.GATE_TOO_LITTLE_EVIDENCE
        assert evaluate.new_feedback_fails(0.5, 0.1, [], config, retrains) == pb.GATE_TOO_LITTLE_EVIDENCE


def test_a_run_starts_on_request_on_enough_new_ratings_or_on_the_timer(tmp_path):
    config = TunerConfig(work_dir=tmp_path, model=tmp_path, min_new_ratings=50, period_seconds=600, retry_seconds=300)
    assert _due(config, True, 0, 0, "failed") == "requested"
    assert _due(config, False, 49, 10, "promoted") is None
    assert _due(config, False, 50, 10, "rejected") == "threshold"  # new beyond what a kept-ratings run judged
    assert _due(config, False, 500, 10, "failed") is None           # a failed run is retried after a pause...
    assert _due(config, False, 500, 301, "failed") == "threshold"   # ...not at once
    assert _due(config, False, 1, 601, "promoted") == "period"
    assert _due(config, False, 0, 601, "promoted") is None
    assert _due(config, False, 500, 601, "promoted", canary=True) is None  # the canary's live ratings decide first
    assert _due(config, True, 0, 0, "promoted", canary=True) == "requested"


def test_the_suite_catches_a_ten_point_loss_nine_times_in_ten():
    """paired_loss's power, computed exactly for the suite as shipped: a candidate that loses 15% of the answer pairs
    and wins 5% (10 points worse) is rejected at 5% at least 9 times in 10; one as good as the serving version that
    disagrees as often (10% each way) at most 5 times in 100."""
    pairs = 2 * len(json.loads(evaluate.SUITE.read_text())["items"])
    assert pairs == len(evaluate.DECODINGS) * 100

    def rejected(losses: int, wins: int) -> bool:
        return evaluate.paired_loss([False] * losses + [True] * wins, [True] * losses + [False] * wins)[2] < 0.05

    def rejection_rate(lose: float, win: float) -> float:
        rate, share = 0.0, lose / (lose + win)
        for differ in range(pairs + 1):  # how many pairs differ, then how many of those it loses
            p_differ = math.comb(pairs, differ) * (lose + win) ** differ * (1 - lose - win) ** (pairs - differ)
            if p_differ > 1e-9:
                rate += p_differ * sum(math.comb(differ, k) * share ** k * (1 - share) ** (differ - k)
                                       for k in range(differ + 1) if rejected(k, differ - k))
        return rate

    assert rejection_rate(0.15, 0.05) >= 0.9
    assert rejection_rate(0.10, 0.10) <= 0.05


def test_paired_loss_counts_only_the_pairs_that_differ():
    assert evaluate.paired_loss([True, False, False, True], [True, True, False, False]) == (1, 1, 0.75)
    assert evaluate.paired_loss([False] * 5, [True] * 5)[2] == 1 / 32


def test_a_versions_suite_results_are_asked_for_once_and_kept_under_its_checksum(monkeypatch, tmp_path):
    asked = []

    async def suite(target, versions, items):  # the server, faked: which versions were put to it, together
        asked.append(versions)
        return [[("answered", (i + v) % 3 == 0) for i in range(200)] for v in versions]

    monkeypatch.setattr(evaluate, "suite_passes", suite)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    config = TunerConfig(work_dir=tmp_path / "tuner", model=model)
    base, v1, v2 = evaluate.Version(0, None), evaluate.Version(1, tmp_path, "a" * 64), evaluate.Version(2, tmp_path,
                                                                                                       "b" * 64)
    as_candidate = evaluate.suite_results(config, [v1, base])
    assert asked == [[1, 0]]
    as_serving = evaluate.suite_results(config, [v2, v1])  # v1 serves now: its results as a candidate are kept
    assert asked == [[1, 0], [2]] and as_serving[1] == as_candidate[0] and as_serving[0] != as_serving[1]
    assert evaluate.suite_results(config, [v2, base]) == [as_serving[0], as_candidate[1]] and len(asked) == 2

    (config.work_dir / "suite-results" / f"{'b' * 64}.json").write_text('{"fingerp')  # torn: asked again
    evaluate.suite_results(config, [v2, v1])
    assert asked[-1] == [2]
    (model / "config.json").write_text('{"hidden_size": 1}')  # another base model: every version asked again
    evaluate.suite_results(config, [v2, v1])
    assert asked[-1] == [2, 1]
