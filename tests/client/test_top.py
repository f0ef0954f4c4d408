"""`instructd top`'s numbers from two scrapes: counter increases (with resets), histogram quantiles as Prometheus
computes them, and a frame that shows them."""

from __future__ import annotations

import pytest

from instructd.client.top import Scrape, bucket_quantile, increase, quantile, render
from instructd.client.types import TuningRun

BEFORE = """\
# TYPE instructd_requests_total counter
instructd_requests_total{method="Generate",code="OK"} 10
instructd_requests_total{method="Generate",code="INTERNAL"} 1
instructd_requests_total{method="Submit",code="OK"} 4
# TYPE instructd_completion_tokens_total counter
instructd_completion_tokens_total 1000
# TYPE instructd_prompt_tokens_total counter
instructd_prompt_tokens_total 200
# TYPE instructd_time_to_first_token_seconds histogram
instructd_time_to_first_token_seconds_bucket{le="0.1"} 5
instructd_time_to_first_token_seconds_bucket{le="0.25"} 8
instructd_time_to_first_token_seconds_bucket{le="+Inf"} 10
instructd_time_to_first_token_seconds_count 10
instructd_time_to_first_token_seconds_sum 2
"""

AFTER = """\
# TYPE instructd_requests_total counter
instructd_requests_total{method="Generate",code="OK"} 30
instructd_requests_total{method="Generate",code="INTERNAL"} 1
instructd_requests_total{method="Submit",code="OK"} 9
instructd_requests_total{method="Promote",code="OK"} 1
# TYPE instructd_requests_in_flight gauge
instructd_requests_in_flight{method="Generate"} 2
# TYPE instructd_completion_tokens_total counter
instructd_completion_tokens_total 1500
# TYPE instructd_prompt_tokens_total counter
instructd_prompt_tokens_total 300
# TYPE instructd_time_to_first_token_seconds histogram
instructd_time_to_first_token_seconds_bucket{le="0.1"} 15
instructd_time_to_first_token_seconds_bucket{le="0.25"} 23
instructd_time_to_first_token_seconds_bucket{le="+Inf"} 30
instructd_time_to_first_token_seconds_count 30
instructd_time_to_first_token_seconds_sum 9
# TYPE instructd_promoted_adapter_version gauge
instructd_promoted_adapter_version 3
# TYPE instructd_serving_adapter_promoted_timestamp_seconds gauge
instructd_serving_adapter_promoted_timestamp_seconds{adapter_version="3",previous_version="2"} 1.7e9
# TYPE instructd_adapter_role gauge
instructd_adapter_role{adapter_version="3",role="serving"} 1
instructd_adapter_role{adapter_version="2",role="previous"} 1
# TYPE instructd_feedback_total counter
instructd_feedback_total{adapter_version="3",rating="up"} 3
instructd_feedback_total{adapter_version="3",rating="down"} 1
instructd_feedback_total{adapter_version="2",rating="up"} 1
instructd_feedback_total{adapter_version="2",rating="down"} 1
instructd_feedback_total{adapter_version="other",rating="up"} 0
instructd_feedback_total{adapter_version="other",rating="down"} 0
"""


def scrapes(seconds: float = 10) -> tuple[Scrape, Scrape]:
    return Scrape.parse(BEFORE, at=100), Scrape.parse(AFTER, at=100 + seconds)


def test_increase_sums_counters_and_counts_new_series_from_zero():
    before, after = scrapes()
    assert increase(before, after, "instructd_requests_total") == 20 + 0 + 5 + 1
    assert increase(before, after, "instructd_requests_total", code="OK") == 26
    assert increase(before, after, "instructd_requests_total", method="Submit") == 5


def test_a_counter_that_went_down_was_reset_and_counts_from_zero():
    before = Scrape.parse("instructd_prompt_tokens_total 500\n", at=0)
    after = Scrape.parse("instructd_prompt_tokens_total 40\n", at=5)
    assert increase(before, after, "instructd_prompt_tokens_total") == 40


@pytest.mark.parametrize("q, expected", [
    # 20 new observations: 10 in (0, 0.1], 5 in (0.1, 0.25], 5 above
    (0.25, 0.05),                    # rank 5 of the first bucket's 10, from 0
    (0.5, 0.1),
    (0.7, 0.1 + 0.15 * 4 / 5),       # rank 14: the 4th of the second bucket's 5
    (0.9, 0.25),                     # rank 18 falls in +Inf: the highest finite bound, as Prometheus answers
])
def test_quantile_of_the_observations_between_the_scrapes(q, expected):
    before, after = scrapes()
    assert quantile(q, before, after, "instructd_time_to_first_token_seconds") == pytest.approx(expected)


def test_quantile_interpolates_from_zero_in_the_first_bucket_and_is_none_without_observations():
    assert bucket_quantile(0.5, [(1.0, 4), (2.0, 4), (float("inf"), 4)]) == pytest.approx(0.5)
    assert bucket_quantile(0.5, [(1.0, 0), (float("inf"), 0)]) is None
    same = Scrape.parse(BEFORE, at=0)
    assert quantile(0.9, same, Scrape.parse(BEFORE, at=5), "instructd_time_to_first_token_seconds") is None


def test_a_frame_shows_rates_quantiles_versions_and_the_run():
    before, after = scrapes(seconds=10)
    run = TuningRun(id=7, status="running", trigger="threshold", started_at="", finished_at="", step=12,
                    total_steps=60, loss=0.4321, examples=40, candidate_version=0, data=None, verdict=None, reason="",
                    data_until=0)
    frame = render(before, after, run)
    assert "requests/s   2.60" in frame and "not OK/s 0.00" in frame and "in flight 2" in frame
    assert "p50 100 ms" in frame and "p90 250 ms" in frame
    assert "in 10.00" in frame and "out 50.00" in frame
    assert "serving      v3 since" in frame and "(replaced v2)" in frame
    lines = frame.splitlines()
    assert any(line.split() == ["v2", "previous", "50%", "of", "2"] for line in lines), frame
    assert any(line.split() == ["v3", "serving", "75%", "of", "4"] for line in lines), frame
    assert any(line.split() == ["other", "-", "of", "0"] for line in lines), frame
    assert "run 7 running: step 12/60, loss 0.4321" in frame
    assert "tuning       no run yet" in render(before, after, None)
