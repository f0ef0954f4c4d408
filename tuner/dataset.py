"""Selects training data from the store: rated exchanges become examples, filtered, capped per user,
with a deterministic held-out slice that is never trained on."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlite_utils

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
    data_until: str = ""
    """Timestamp of the newest rating considered; the next run starts after it."""

    @property
    def exchange_ids(self) -> list[str]:
        return sorted({e.exchange_id for e in self.train})

    def summary(self) -> dict:
        return {"train_desirable": sum(e.desirable for e in self.train),
                "train_undesirable": sum(not e.desirable for e in self.train),
                "held_out": len(self.held_out), "history": len(self.history), "dropped": dict(self.dropped)}


_RATED = """
    SELECT e.id, e.messages_json, e.response, e.finish_reason, f.rating, f.correction, f.user_id, f.updated_at
    FROM feedback f JOIN exchanges e ON e.id = f.response_id
    WHERE f.updated_at > ? ORDER BY f.updated_at, f.id"""


def build_dataset(config: TunerConfig, since: str, classifier: Callable[[Example], bool] | None = None) -> Dataset:
    """Everything rated after `since` (ISO time; '' for all) turned into a filtered, split dataset."""
    db = sqlite_utils.Database(config.db_path)
    try:
        rows = list(db.query(_RATED, [""]))
    finally:
        db.close()
    data = Dataset(data_until=max((r["updated_at"] for r in rows), default=since))
    seen: set[tuple] = set()
    for example, reason, rated_at in _examples(rows):
        new = rated_at > since
        if not new and not config.include_older and not _is_held_out(example.exchange_id, config.held_out_share):
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
        if not _is_held_out(example.exchange_id, config.held_out_share):
            data.train.append(example)
        else:
            (data.held_out if new else data.history).append(example)
    data.train = _cap_users(data.train, config.max_user_share, data.dropped)
    return data


def _examples(rows: list[dict]):
    """👍 answers and corrections are desirable; 👎 answers undesirable. Yields (example, reason to drop, time)."""
    for r in rows:
        messages = tuple((m["role"], m["content"]) for m in json.loads(r["messages_json"]))
        make = lambda answer, good: Example(r["id"], messages, answer, good, r["user_id"])  # noqa: E731
        if r["correction"].strip():
            yield make(r["correction"], True), None, r["updated_at"]
        reason = "empty" if not r["response"].strip() else "truncated" if r["finish_reason"] != "stop" else None
        yield make(r["response"], r["rating"] == "up"), reason, r["updated_at"]


def _flagged(example: Example, blocklist: tuple[str, ...], classifier) -> str | None:
    text = " ".join(c for _, c in example.messages).lower() + " " + example.answer.lower()
    if any(phrase.lower() in text for phrase in blocklist):
        return "blocklisted"
    if classifier is not None and classifier(example):
        return "flagged"
    return None


def _is_held_out(exchange_id: str, share: float) -> bool:
    """By a hash of the exchange id: stable across runs, so a held-out exchange is never trained on."""
    digest = int(hashlib.sha256(exchange_id.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < share


def _cap_users(examples: list[Example], share: float, dropped: Counter) -> list[Example]:
    """Keeps each user's count at most `share` of the result, so no single rater steers the model."""
    if share >= 1:
        return examples
    counts = Counter(e.user_id for e in examples)
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

