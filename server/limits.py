"""Backpressure and fairness: a bound on generation requests in flight, and per-key rate limits. Both refuse
at once with RESOURCE_EXHAUSTED and say when to retry, rather than letting a queue grow without end."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import ResourceExhausted


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """A token bucket per key: `per_second` on average, bursts of up to two seconds' worth. 0: no limit."""

    def __init__(self, per_second: float, what: str) -> None:
        self._rate, self._burst, self._what = per_second, 2 * per_second, what
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> None:
        """Spends one token of `key`'s bucket, or raises ResourceExhausted with the wait for the next one."""
        if not self._rate:
            return
        now = time.monotonic()
        bucket = self._buckets.setdefault(key, _Bucket(self._burst, now))
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
        bucket.stamp = now
        if bucket.tokens < 1:
            raise ResourceExhausted(f"rate limit: {self._rate:g} {self._what} per second for this key",
                                    retry_after=(1 - bucket.tokens) / self._rate)
        bucket.tokens -= 1


class Admission:
    """Counts generation requests in flight (running in the engine or waiting for it) and refuses one more
    than `limit`. Only the event loop touches it, so a plain counter is enough."""

    RETRY_AFTER = 1.0  # seconds: long enough for a few answers to finish on a busy CPU

    def __init__(self, limit: int) -> None:
        self.limit, self.in_flight = limit, 0

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        if self.in_flight >= self.limit:
            raise ResourceExhausted(f"the server is busy: {self.limit} generation requests are in flight, the most "
                                    "it admits", retry_after=self.RETRY_AFTER)
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
