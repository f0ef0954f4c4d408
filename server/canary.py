"""The live canary: which users a candidate serves, and the sequential rule that decides from their ratings
whether it is promoted, rolled back, or neither. Pure logic; the router applies it, the store counts the ratings."""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass
from statistics import NormalDist

from instructd.v1 import instructd_pb2 as pb


class CanaryMode(enum.Enum):
    AUTO = pb.CANARY_AUTO      # the live ratings promote or roll back
    MANUAL = pb.CANARY_MANUAL  # they roll back; an operator promotes (`instructd promote`)
    OFF = pb.CANARY_OFF        # a candidate is promoted at once


class CanaryOutcome(enum.Enum):
    """How a canary ended (stored as its value)."""

    PROMOTED = "promoted"        # its ratings (or an operator) promoted the candidate
    ROLLED_BACK = "rolled_back"  # clearly worse: the incumbent stays, the candidate is never routed to again
    EXPIRED = "expired"          # a limit came without a clear call: the incumbent stays
    ENDED = "ended"              # another promotion, rollback or canary ended it first


class CanaryCall(enum.Enum):
    UNDECIDED = pb.CANARY_UNDECIDED
    NO_WORSE = pb.CANARY_NO_WORSE
    WORSE = pb.CANARY_WORSE


def audience(user_id: str, response_id: str) -> str:
    """Who a request counts as in a canary: its user, or, without a user id, the request itself (by its response
    id), so that an application that sends no user ids still gives the canary its share of answers."""
    return user_id or f"#{response_id}"


def in_canary(who: str, version: int, share: float) -> bool:
    """Whether `who` (see `audience`) falls in the candidate's share: a hash of (version, who), so each user sees one
    version for the whole canary, and each canary draws its own users."""
    if not who:
        return False
    digest = hashlib.sha256(f"canary/{version}/{who}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < share


@dataclass(frozen=True)
class CanaryRecord:
    """A running canary as the store keeps it."""

    id: int
    version: int
    incumbent: int
    share: float
    started_at: str


@dataclass(frozen=True)
class Tally:
    """Ratings of the answers each version gave since the canary started."""

    candidate_up: int = 0
    candidate_down: int = 0
    incumbent_up: int = 0
    incumbent_down: int = 0

    @property
    def candidate(self) -> int:
        return self.candidate_up + self.candidate_down

    @property
    def incumbent(self) -> int:
        return self.incumbent_up + self.incumbent_down


@dataclass(frozen=True)
class CanaryRule:
    """A Bayesian beta-binomial rule, looked at after every rating. Each version's 👍 rate has a Beta(1 + up,
    1 + down) posterior; d = candidate's rate minus the incumbent's, approximated as normal. Once both versions have
    `min_ratings` ratings, the candidate is clearly worse when P(d < 0) ≥ `rollback_confidence`, and clearly no worse
    when P(d > -margin) ≥ `promote_confidence` (worse is checked first).

    Error rates, with looks after every rating up to 200 candidate ratings and the incumbent rated 9× as often
    (a 10% share), 👍 rates around 0.5, 1,000 simulated canaries each: a candidate as good as the incumbent is rolled
    back about 3% of the time (false rollback), and one 10 points worse is promoted under 1% of the time (false
    promotion). `tests/server/test_canary.py::test_the_rule_s_error_rates` holds both under 5%."""

    min_ratings: int = 30
    margin: float = 0.05
    promote_confidence: float = 0.99
    rollback_confidence: float = 0.998

    def call(self, tally: Tally) -> tuple[CanaryCall, float, float]:
        """The call, P(no worse) and P(worse)."""
        mean, var = _beta(tally.candidate_up, tally.candidate_down)
        mean_i, var_i = _beta(tally.incumbent_up, tally.incumbent_down)
        d, sd = mean - mean_i, math.sqrt(var + var_i)
        p_worse, p_no_worse = _phi(-d / sd), _phi((d + self.margin) / sd)
        if min(tally.candidate, tally.incumbent) < self.min_ratings:
            return CanaryCall.UNDECIDED, p_no_worse, p_worse
        if p_worse >= self.rollback_confidence:
            return CanaryCall.WORSE, p_no_worse, p_worse
        if p_no_worse >= self.promote_confidence:
            return CanaryCall.NO_WORSE, p_no_worse, p_worse
        return CanaryCall.UNDECIDED, p_no_worse, p_worse


def _beta(up: int, down: int) -> tuple[float, float]:
    """Mean and variance of Beta(1 + up, 1 + down)."""
    a, b = 1 + up, 1 + down
    return a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))


_phi = NormalDist().cdf
