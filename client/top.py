"""What `instructd top` shows, computed from two scrapes of /metrics the way Prometheus' increase() and
histogram_quantile() compute it over the interval between them. Pure: it reads and writes nothing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from prometheus_client.parser import text_string_to_metric_families

from .types import TuningRun

Labels = frozenset  # of (name, value) pairs


@dataclass(frozen=True)
class Scrape:
    """Every sample of one /metrics page, and when it was read (seconds on any one clock)."""

    at: float
    samples: dict[tuple[str, Labels], float]

    @classmethod
    def parse(cls, text: str, at: float) -> Scrape:
        return cls(at, {(s.name, frozenset(s.labels.items())): s.value
                        for family in text_string_to_metric_families(text) for s in family.samples})

    def series(self, name: str, **match: str) -> dict[Labels, float]:
        """The samples called `name` whose labels include `match`."""
        return {labels: value for (n, labels), value in self.samples.items()
                if n == name and match.items() <= dict(labels).items()}

    def total(self, name: str, **match: str) -> float:
        return sum(self.series(name, **match).values())


def increase(before: Scrape, after: Scrape, name: str, **match: str) -> float:
    """How much the counters called `name` grew between the scrapes, summed. A counter that went down was reset
    by a restart in between and counts from zero, as in Prometheus."""
    old = before.series(name, **match)
    return sum(_grew(old.get(labels, 0.0), value) for labels, value in after.series(name, **match).items())


def quantile(q: float, before: Scrape, after: Scrape, histogram: str, **match: str) -> float | None:
    """The q-quantile of what the histogram observed between the scrapes; None if it observed nothing."""
    old, counts = before.series(f"{histogram}_bucket", **match), {}
    for labels, value in after.series(f"{histogram}_bucket", **match).items():
        bound = float(dict(labels)["le"])
        counts[bound] = counts.get(bound, 0.0) + _grew(old.get(labels, 0.0), value)
    return bucket_quantile(q, sorted(counts.items()))


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """histogram_quantile on cumulative (upper bound, count) buckets, the last one +Inf: linear interpolation
    inside the bucket the rank falls in; in the +Inf bucket, the highest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            return lower if math.isinf(bound) else lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _grew(before: float, after: float) -> float:
    return after - before if after >= before else after


def render(before: Scrape, after: Scrape, run: TuningRun | None) -> str:
    """One frame of `instructd top`: rates over the interval between the scrapes, ratings since the server started."""
    seconds = after.at - before.at

    def per_second(name: str, **match: str) -> str:
        return f"{increase(before, after, name, **match) / seconds:.2f}"

    def ttft(q: float) -> str:
        value = quantile(q, before, after, "instructd_time_to_first_token_seconds")
        return "-" if value is None else f"{value * 1000:.0f} ms"

    failed = increase(before, after, "instructd_requests_total") - increase(before, after, "instructd_requests_total",
                                                                         code="OK")
    lines = [
        f"serving      {_serving(after)}",
        f"requests/s   {per_second('instructd_requests_total')}   not OK/s {failed / seconds:.2f}   in flight "
        f"{after.total('instructd_requests_in_flight'):.0f}",
        f"first token  p50 {ttft(0.5)}   p90 {ttft(0.9)}   (over the last {seconds:.0f}s)",
        f"tokens/s     in {per_second('instructd_prompt_tokens_total')}   out "
        f"{per_second('instructd_completion_tokens_total')}",
        "👍 rate      since the server started, by the version that answered:",
        *_ratings(after),
        f"tuning       {_run(run)}",
    ]
    return "\n".join(lines)


def _version(label: str) -> str:
    return "base" if label == "0" else label if label == "other" else f"v{label}"


def _serving(scrape: Scrape) -> str:
    text = _version(str(int(scrape.total("instructd_promoted_adapter_version"))))
    for labels, at in scrape.series("instructd_serving_adapter_promoted_timestamp_seconds").items():
        text += f" since {datetime.fromtimestamp(at):%Y-%m-%d %H:%M:%S}"
        if dict(labels).get("previous_version"):
            text += f" (replaced {_version(dict(labels)['previous_version'])})"
    return text


def _ratings(scrape: Scrape) -> list[str]:
    roles = {dict(labels)["adapter_version"]: dict(labels)["role"]
             for labels in scrape.series("instructd_adapter_role")}
    versions = sorted({dict(labels)["adapter_version"] for labels in scrape.series("instructd_feedback_total")},
                      key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0))
    lines = []
    for version in versions:
        up = scrape.total("instructd_feedback_total", adapter_version=version, rating="up")
        rated = scrape.total("instructd_feedback_total", adapter_version=version)
        rate = f"{up / rated:4.0%}" if rated else "   -"
        lines.append(f"  {_version(version):<7} {roles.get(version, ''):<10} {rate} of {rated:.0f}")
    return lines


def _run(run: TuningRun | None) -> str:
    if run is None:
        return "no run yet"
    if run.status == "running":
        return f"run {run.id} running: step {run.step}/{run.total_steps}, loss {run.loss:.4f}"
    candidate = f", candidate v{run.candidate_version}" if run.candidate_version else ""
    return f"run {run.id} {run.status}{candidate} (finished {run.finished_at})"
