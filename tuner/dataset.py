"""Selects training data from the exported ratings: rated exchanges become examples, filtered, capped per user,
with the server's held-out slice never trained on."""

from __future__ import annotations

import hashlib
import importlib
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from instructd.v1 import instructd_pb2 as pb

from .checks import repetition
from .config import TunerConfig


@dataclass(frozen=True)
class Example:
    """One training or evaluation example: a conversation, an answer, and whether it is wanted."""

    exchange_id: str
    messages: tuple[tuple[str, str], ...]
    answer: str
    desirable: bool
    user_id: str = ""
    rejected: str = ""
    """On a correction of a 👎 answer: that answer, so the two make a preference pair (DPO)."""

    @property
    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class Dataset:
    train: list[Example] = field(default_factory=list)
    held_out: list[Example] = field(default_factory=list)
    """Held-out examples rated since the last run: the new feedback the candidate must do better on."""
    history: list[Example] = field(default_factory=list)
    """Held-out examples rated before: feedback that earlier candidates were judged on; never trained on."""
    dropped: Counter = field(default_factory=Counter)
    """Why examples were left out: {'empty': 2, 'truncated': 5, ...}."""

    @property
    def exchange_ids(self) -> list[str]:
        return sorted({e.exchange_id for e in self.train})

    def summary(self) -> pb.DataSummary:
        return pb.DataSummary(train_desirable=sum(e.desirable for e in self.train),
                              train_undesirable=sum(not e.desirable for e in self.train),
                              held_out=len(self.held_out), history=len(self.history), dropped=dict(self.dropped))


def build_dataset(config: TunerConfig, new: list[pb.RatedExchange], old: list[pb.RatedExchange],
                  classifier: Callable[[Example], bool] | None = None, learnt: frozenset[str] = frozenset()) -> Dataset:
    """Exported ratings turned into a filtered, split dataset: `new` ones (rated since the last judged run) train
    the candidate or, held out, judge it; `old` held-out ones are the gate's history; old trainable ones train too
    when their exchange is in `learnt` (what the serving version learnt, for a candidate trained from the base) or
    with include_older. The held-out flag is the server's, so every replica agrees on it."""
    data = Dataset()
    seen: set[tuple] = set()
    for is_new, rows in ((False, old), (True, new)):
        for example, reason, held_out in _examples(rows):
            if not (is_new or held_out or config.include_older or example.exchange_id in learnt):
                continue
            if reason is None and example.desirable and repetition(example.answer) > config.max_repetition:
                reason = "repetitive"
            if reason is None:
                reason = _flagged(example, config.blocklist, classifier)
            key = (example.messages, example.answer.strip(), example.desirable)
            if reason is None and key in seen:
                reason = "duplicate"
            if reason:
                data.dropped[reason] += 1
                continue
            seen.add(key)
            if not held_out:
                data.train.append(example)
            else:
                (data.held_out if is_new else data.history).append(example)
    data.train = _cap_users(data.train, config.max_user_share, data.dropped)
    return data


def for_objective(examples: list[Example], objective: str) -> list[Example]:
    """What an objective learns from: sft the desirable answers, kto every answer, dpo the corrections of 👎 answers
    (each with the answer it replaces)."""
    if objective == "kto":
        return examples
    return [e for e in examples if e.rejected] if objective == "dpo" else [e for e in examples if e.desirable]


def _examples(rows: list[pb.RatedExchange]):
    """👍 answers and corrections are desirable; 👎 answers undesirable. Yields (example, reason to drop, held out).
    An answer cut off at max_tokens is kept when rated 👎 (it was bad so far, or too long: either way unwanted, and a
    correction of it is a whole example); a 👍 one is dropped, since learning it would teach stopping mid-answer."""
    for r in rows:
        messages = tuple((m.role, m.content) for m in r.messages)
        if r.correction.strip():
            rejected = r.response if r.rating == pb.RATING_DOWN and r.response.strip() else ""
            yield Example(r.exchange_id, messages, r.correction, True, r.rater, rejected), None, r.held_out
        cut_off = r.finish_reason != "stop" and r.rating == pb.RATING_UP
        reason = "empty" if not r.response.strip() else "truncated" if cut_off else None
        yield Example(r.exchange_id, messages, r.response, r.rating == pb.RATING_UP, r.rater), reason, r.held_out


def _flagged(example: Example, blocklist: tuple[str, ...], classifier) -> str | None:
    text = " ".join([*(c for _, c in example.messages), example.answer, example.rejected]).lower()
    if any(phrase.lower() in text for phrase in blocklist):
        return "blocklisted"
    if classifier is not None and classifier(example):
        return "flagged"
    return None


def _cap_users(examples: list[Example], share: float, dropped: Counter) -> list[Example]:
    """Keeps each user's count at most `share` of the result, so no single rater steers the model. It guards against
    one rater among many, not against having few: with a single rater (or an application that sends no user ids)
    there is no one to outweigh, and everything is kept."""
    counts = Counter(e.user_id for e in examples)
    if share >= 1 or len(counts) < 2:
        return examples
    allowed = {}
    for user, n in counts.items():
        others = len(examples) - n
        allowed[user] = min(n, math.floor(share * others / (1 - share)))
    kept, used = [], Counter()
    for e in sorted(examples, key=lambda e: hashlib.sha256(e.exchange_id.encode()).hexdigest()):
        if used[e.user_id] < allowed[e.user_id]:
            used[e.user_id] += 1
            kept.append(e)
        else:
            dropped["user_cap"] += 1
    return kept


def load_classifier(spec: str) -> Callable[[Example], bool] | None:
    """'package.module:function' -> a function that returns True for an example to leave out."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)

