"""The metrics the dashboard and alerts rely on, on their own registry: every rpc has series, adapter_version
values stay bounded, promotions are visible, the tuner's numbers come from the store, and vLLM's names survive."""

from __future__ import annotations

import asyncio
import time
from wsgiref.util import setup_testing_defaults

from prometheus_client import CollectorRegistry, Gauge

from instructd.server.auth import Principal, Role
from instructd.server.domain import AdapterChoice, Completion, FeedbackInput, GenerationRequest, Sampling
from instructd.server.metrics import Metrics, TuningCollector, metrics_app
from instructd.server.records import RunTrigger
from instructd.server.store import Store
from instructd.v1 import instructd_pb2 as pb

HI = GenerationRequest(({"role": "user", "content": "hi"},), Sampling(), AdapterChoice())


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def feedback_versions(metrics: Metrics) -> set[str]:
    return {s.labels["adapter_version"] for family in metrics.registry.collect() if family.name == "instructd_feedback"
            for s in family.samples if s.name == "instructd_feedback_total"}


def test_every_rpc_of_the_proto_has_its_series_before_the_first_call():
    metrics = Metrics(CollectorRegistry())
    rpcs = [m.name for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods]
    assert {"RecordEvaluation", "TriggerTuning", "GetTuningStatus"} <= set(rpcs)
    for rpc in rpcs:
        assert value(metrics, "instructd_requests_total", method=rpc, code="OK") == 0
        assert value(metrics, "instructd_requests_total", method=rpc, code="INTERNAL") == 0
        assert value(metrics, "instructd_requests_in_flight", method=rpc) == 0


def test_only_serving_previous_and_candidate_versions_keep_their_own_label():
    metrics = Metrics(CollectorRegistry())
    assert feedback_versions(metrics) == {"0", "other"}
    for version in range(1, 6):  # five promotions, each of the newest registered version
        metrics.candidate_registered(version)
        metrics.serving_changed(version, previous=version - 1, promoted_at=1000.0 + version)
    metrics.candidate_registered(6)
    assert feedback_versions(metrics) == {"4", "5", "6", "other"}
    roles = {s.labels["adapter_version"]: s.labels["role"] for family in metrics.registry.collect()
             if family.name == "instructd_adapter_role" for s in family.samples}
    assert roles == {"5": "serving", "4": "previous", "6": "candidate"}

    metrics.count_feedback("up", 5)
    metrics.count_feedback("down", 2)  # a version without a role, asked for by number
    assert value(metrics, "instructd_feedback_total", rating="up", adapter_version="5") == 1
    assert value(metrics, "instructd_feedback_total", rating="down", adapter_version="other") == 1
    assert value(metrics, "instructd_feedback_total", rating="down", adapter_version="2") is None


def test_a_promotion_shows_the_serving_version_since_when_and_what_it_replaced():
    metrics = Metrics(CollectorRegistry())
    assert value(metrics, "instructd_promoted_adapter_version") == 0
    metrics.serving_changed(3, previous=0, promoted_at=1_700_000_000.0)
    metrics.serving_changed(2, previous=3, promoted_at=1_700_000_100.0)  # a rollback
    assert value(metrics, "instructd_promoted_adapter_version") == 2
    assert value(metrics, "instructd_serving_adapter_promoted_timestamp_seconds", adapter_version="2",
                 previous_version="3") == 1_700_000_100.0
    assert value(metrics, "instructd_serving_adapter_promoted_timestamp_seconds", adapter_version="3",
                 previous_version="0") is None  # one series: the serving version's


def test_the_store_s_writer_reports_each_batch_it_commits(tmp_path):
    metrics = Metrics(CollectorRegistry())
    store = Store(tmp_path / "instructd.db", on_batch=metrics.write_batch)
    writes = [store.log_exchange(HI, Completion(f"e{i}", "hello", "stop", 3, 1, 0)) for i in range(40)]
    for write in writes:
        write.result(timeout=30)
    store.close()
    batches = value(metrics, "instructd_store_write_batch_writes_count")
    assert value(metrics, "instructd_store_write_batch_writes_sum") == 40  # every write, in some batch
    assert 1 <= batches <= 40
    assert value(metrics, "instructd_store_write_batch_seconds_count") == batches
    assert value(metrics, "instructd_store_write_batch_seconds_sum") > 0


def test_a_committed_write_is_counted_before_its_caller_wakes(tmp_path):
    """A scrape right after an awaited write must count it (CI once saw the feedback test's rating uncounted)."""
    seen: list[int] = []

    def slow_observer(writes: int, seconds: float) -> None:
        time.sleep(0.2)  # a slow scrape-side update: the caller must still find it done
        seen.append(writes)

    store = Store(tmp_path / "instructd.db", on_batch=slow_observer)
    try:
        for i in range(3):  # an awaited write, then a write whose future is waited on: both counted on waking
            asyncio.run(store.replica_id(f"r{i}"))
            assert sum(seen) == 2 * i + 1
            store.log_exchange(HI, Completion(f"e{i}", "hello", "stop", 3, 1, 0)).result(timeout=30)
            assert sum(seen) == 2 * i + 2
    finally:
        store.close()


def test_tuning_metrics_count_unlearned_ratings_and_failures_in_a_row(tmp_path):
    store = Store(tmp_path / "instructd.db")
    tuner = Principal("t1", "instructd-tuner", Role.TUNER)

    async def rate(i: int) -> int:
        await asyncio.wrap_future(store.log_exchange(HI, Completion(f"e{i}", "hello", "stop", 3, 1, 0)))
        await store.record_feedback(FeedbackInput(f"e{i}", "up"))
        return (await store.tuning_status(1)).newest_cursor

    async def run(outcome: int, cursor: int | None = None, **fields) -> int:
        started = await store.start_run(RunTrigger.THRESHOLD, tuner)
        update = pb.UpdateRunRequest(id=started.id, outcome=outcome, **fields)
        if cursor is not None:
            update.data_until = cursor
        return (await store.update_run(update)).id

    metrics = Metrics(CollectorRegistry())
    metrics.registry.register(TuningCollector(store.tuning_summary))
    cursors = [asyncio.run(rate(i)) for i in range(3)]
    assert value(metrics, "instructd_tuning_new_ratings") == 3
    assert value(metrics, "instructd_tuning_last_run_loss") is None  # no finished run yet

    verdict = pb.Verdict(passed=False, reason="suite falls", current_margin=0.1, candidate_suite=0.5,
                         current_suite=0.6, suite_by_check={"answered": pb.SuiteScore(candidate=0.5, current=0.6)})
    judged = asyncio.run(run(pb.RUN_REJECTED, cursors[1], verdict=verdict, examples=12, loss=0.75))
    for _ in range(2):
        asyncio.run(run(pb.RUN_FAILED, reason="out of memory"))
    assert value(metrics, "instructd_tuning_new_ratings") == 1  # only the rating after the judged run's data
    assert value(metrics, "instructd_tuning_consecutive_failed_runs") == 2
    assert value(metrics, "instructd_tuning_runs_total", outcome="failed") == 2
    assert value(metrics, "instructd_tuning_last_run_finished_timestamp_seconds", run=str(judged + 2),
                 outcome="failed") > 0
    assert value(metrics, "instructd_tuning_last_gate_score", gate="suite", model="current") is None  # a failed run

    asyncio.run(run(pb.RUN_PROMOTED, cursors[2], verdict=verdict, examples=20, loss=0.5))
    assert value(metrics, "instructd_tuning_consecutive_failed_runs") == 0
    assert value(metrics, "instructd_tuning_new_ratings") == 0
    assert value(metrics, "instructd_tuning_last_run_examples") == 20
    assert value(metrics, "instructd_tuning_last_gate_score", gate="suite", model="current") == 0.6
    feedback_only = pb.Verdict(passed=False, reason="not better", candidate_margin=0.1, current_margin=0.2)
    asyncio.run(run(pb.RUN_REJECTED, verdict=feedback_only, examples=8, loss=0.9))
    assert value(metrics, "instructd_tuning_last_gate_score", gate="feedback_margin", model="current") == 0.2
    assert value(metrics, "instructd_tuning_last_gate_score", gate="suite", model="current") is None  # not put to it
    store.close()


def test_the_page_keeps_vllms_colon_names_whatever_format_the_scraper_asks_for():
    metrics = Metrics(CollectorRegistry())
    Gauge("vllm:num_requests_running", "Requests running.", ["engine"], registry=metrics.registry).labels("0").set(2)
    app = metrics_app(metrics)
    for accept in ("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5", "text/plain", ""):
        environ = {"HTTP_ACCEPT": accept, "PATH_INFO": "/metrics"}
        setup_testing_defaults(environ)
        started = []
        page = b"".join(app(environ, lambda status, headers: started.append((status, dict(headers))))).decode()
        assert started[0][0].startswith("200") and started[0][1]["Content-Type"].startswith("text/plain")
        assert 'vllm:num_requests_running{engine="0"} 2.0' in page.splitlines()
