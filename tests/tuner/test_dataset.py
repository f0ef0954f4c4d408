"""Data selection on a real SQLite store: what becomes training data, what is filtered, what is held out."""

from __future__ import annotations

import asyncio
from pathlib import Path

from instructd.server.domain import AdapterChoice, Completion, FeedbackInput, GenerationRequest, Sampling
from instructd.server.store import Store
from instructd.tuner.checks import passes
from instructd.tuner.config import TunerConfig
from instructd.tuner.dataset import build_dataset


LOOP = "Apples are red. Pears are green. " + "Apples are red. " * 6


def _store_with(tmp_path: Path, rows: list[tuple]) -> TunerConfig:
    """rows: (id, prompt, answer, finish_reason, rating, correction, user)."""
    async def fill():
        store = Store(tmp_path / "instructd.db")
        for rid, prompt, answer, finish, rating, correction, user in rows:
            request = GenerationRequest(({"role": "user", "content": prompt},), Sampling(), AdapterChoice())
            store.log_exchange(request, Completion(rid, answer, finish, 5, 5, 0))
            await store.record_feedback(FeedbackInput(rid, rating, correction=correction, user_id=user))
        store.close()

    asyncio.run(fill())
    return TunerConfig(data_dir=tmp_path, adapter_dir=tmp_path / "in", model=tmp_path, held_out_share=0.0,
                       max_user_share=1.0, blocklist=("forbidden",))


def test_ratings_become_examples_and_bad_ones_are_filtered(tmp_path):
    config = _store_with(tmp_path, [
        ("a", "Say hi.", "hi there", "stop", "up", "", "u1"),
        ("b", "Say hi.", "HELLO", "stop", "down", "hello", "u2"),
        ("c", "Say hi.", "cut off", "length", "up", "", "u3"),
        ("d", "Say hi.", "forbidden words", "stop", "up", "", "u4"),
        ("e", "Say hi.", "hi there", "stop", "up", "", "u5"),      # same conversation and answer as a
        ("f", "Say bye.", "Bye", "stop", "down", "", "u6"),
        ("g", "List fruit.", LOOP, "stop", "up", "", "u7"),          # a 👍 answer stuck in a loop...
        ("h", "List fruit.", LOOP, "stop", "down", "", "u8"),        # ...is still a fine 👎 example
    ])
    data = build_dataset(config, since="")
    got = sorted((e.exchange_id, e.answer, e.desirable) for e in data.train)
    assert got == [("a", "hi there", True), ("b", "HELLO", False), ("b", "hello", True), ("f", "Bye", False),
                   ("h", LOOP, False)]
    assert data.dropped == {"truncated": 1, "blocklisted": 1, "duplicate": 1, "repetitive": 1}
    assert data.exchange_ids == ["a", "b", "f", "h"]
    assert build_dataset(config, since=data.data_until).train == []  # nothing new since


def test_held_out_slice_is_deterministic_and_disjoint(tmp_path):
    rows = [(f"r{i}", f"Question {i}?", f"answer {i}", "stop", "up", "", f"u{i % 9}") for i in range(200)]
    config = _store_with(tmp_path, rows)
    config = TunerConfig(**{**config.__dict__, "held_out_share": 0.2})
    first, second = build_dataset(config, ""), build_dataset(config, "")
    held = {e.exchange_id for e in first.held_out}
    assert held == {e.exchange_id for e in second.held_out}
    assert not held & {e.exchange_id for e in first.train}
    assert 20 <= len(held) <= 60


def test_one_rater_cannot_dominate(tmp_path):
    rows = [(f"m{i}", f"Q{i}?", f"a{i}", "stop", "up", "", "mallory") for i in range(30)]
    rows += [(f"o{i}", f"P{i}?", f"b{i}", "stop", "up", "", f"user{i}") for i in range(10)]
    config = _store_with(tmp_path, rows)
    config = TunerConfig(**{**config.__dict__, "max_user_share": 0.5})
    data = build_dataset(config, "")
    assert sum(e.user_id == "mallory" for e in data.train) == 10
    assert data.dropped["user_cap"] == 20


def test_instruction_checks():
    assert passes("all small here.", {"type": "lowercase"}) and not passes("Not so.", {"type": "lowercase"})
    assert passes("Pacific", {"type": "one_word"}) and not passes("The Pacific", {"type": "one_word"})
    assert passes("one two three", {"type": "max_words", "n": 3})
    assert not passes("a b c d", {"type": "max_words", "n": 3})
    assert passes("Bye. See you soon.", {"type": "ends_with", "phrase": "See you soon."})
    assert not passes("same\nsame\nsame\n", {"type": "answered"})


def test_earlier_held_out_feedback_becomes_history(tmp_path):
    first = [(f"a{i}", f"Old question {i}?", f"old {i}", "stop", "up", "", f"u{i % 9}") for i in range(100)]
    config = _store_with(tmp_path, first)
    config = TunerConfig(**{**config.__dict__, "held_out_share": 0.3})
    since = build_dataset(config, "").data_until
    second = [(f"b{i}", f"New question {i}?", f"new {i}", "stop", "down", "", f"u{i % 9}") for i in range(100)]
    _store_with(tmp_path, second)
    data = build_dataset(config, since)
    assert data.history and all(e.exchange_id.startswith("a") for e in data.history)
    assert data.held_out and all(e.exchange_id.startswith("b") for e in data.held_out)
    assert all(e.exchange_id.startswith("b") for e in data.train)  # older ratings are not trained on again
