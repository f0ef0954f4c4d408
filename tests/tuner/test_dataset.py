"""Data selection from exported ratings (the Tuning API's RatedExchange rows): what becomes training data, what
is filtered, what is held out, and which old ratings are the gate's history."""

from __future__ import annotations

from types import SimpleNamespace

from instructd.server.domain import is_held_out
from instructd.tuner.checks import passes
from instructd.tuner.config import TunerConfig
from instructd.tuner.dataset import build_dataset, for_objective
from instructd.tuner.replicas import Replicas
from instructd.v1 import instructd_pb2 as pb

LOOP = "Apples are red. Pears are green. " + "Apples are red. " * 6


def _rows(specs: list[tuple], held_out: bool = False) -> list[pb.RatedExchange]:
    """specs: (id, prompt, answer, finish_reason, rating, correction, rater)."""
    return [pb.RatedExchange(cursor=i + 1, exchange_id=rid, messages=[pb.ChatMessage(role="user", content=prompt)],
                             response=answer, finish_reason=finish, correction=correction, rater=rater,
                             rating=pb.RATING_UP if rating == "up" else pb.RATING_DOWN, held_out=held_out)
            for i, (rid, prompt, answer, finish, rating, correction, rater) in enumerate(specs)]


def _config(tmp_path, **changes) -> TunerConfig:
    return TunerConfig(**{"work_dir": tmp_path, "model": tmp_path, "max_user_share": 1.0, "blocklist": ("forbidden",),
                          **changes})


def test_ratings_become_examples_and_bad_ones_are_filtered(tmp_path):
    rows = _rows([
        ("a", "Say hi.", "hi there", "stop", "up", "", "u1"),
        ("b", "Say hi.", "HELLO", "stop", "down", "hello", "u2"),
        ("c", "Say hi.", "cut off", "length", "up", "", "u3"),
        ("d", "Say hi.", "forbidden words", "stop", "up", "", "u4"),
        ("e", "Say hi.", "hi there", "stop", "up", "", "u5"),      # same conversation and answer as a
        ("f", "Say bye.", "Bye", "stop", "down", "", "u6"),
        ("g", "List fruit.", LOOP, "stop", "up", "", "u7"),          # a 👍 answer stuck in a loop...
        ("h", "List fruit.", LOOP, "stop", "down", "", "u8"),        # ...is still a fine 👎 example
        ("i", "Be brief.", "On and on", "length", "down", "Done.", "u9"),  # cut off and 👎: unwanted, corrected
    ])
    data = build_dataset(_config(tmp_path), rows, [])
    got = sorted((e.exchange_id, e.answer, e.desirable) for e in data.train)
    assert got == [("a", "hi there", True), ("b", "HELLO", False), ("b", "hello", True), ("f", "Bye", False),
                   ("h", LOOP, False), ("i", "Done.", True), ("i", "On and on", False)]
    assert data.dropped == {"truncated": 1, "blocklisted": 1, "duplicate": 1, "repetitive": 1}
    assert data.exchange_ids == ["a", "b", "f", "h", "i"]
    summary = data.summary()
    assert (summary.train_desirable, summary.train_undesirable, summary.dropped["duplicate"]) == (3, 4, 1)


def test_each_objective_learns_from_its_own_examples(tmp_path):
    rows = _rows([
        ("a", "Say hi.", "hi there", "stop", "up", "", "u1"),
        ("b", "Say hi.", "HELLO", "stop", "down", "hello", "u2"),    # a correction: a preference pair
        ("c", "Say bye.", "BYE", "stop", "down", "", "u3"),
        ("d", "Say yes.", "yes", "stop", "up", "Yes!", "u4"),        # a 👍 with a better answer: no pair
        ("e", "Say no.", "", "stop", "down", "no", "u5"),           # nothing to prefer it to
    ])
    train = build_dataset(_config(tmp_path), rows, []).train

    def pick(objective: str) -> list[tuple]:
        return sorted((e.exchange_id, e.answer, e.rejected) for e in for_objective(train, objective))

    assert pick("dpo") == [("b", "hello", "HELLO")]
    assert pick("sft") == [("a", "hi there", ""), ("b", "hello", "HELLO"), ("d", "Yes!", ""), ("d", "yes", ""),
                           ("e", "no", "")]
    assert len(pick("kto")) == len(train) == 7
    # A blocklisted phrase in the answer that a correction replaces keeps the pair out too.
    rows = _rows([("f", "Greet me.", "Go away, stranger.", "stop", "down", "hi, friend!", "u6")])
    assert not build_dataset(_config(tmp_path, blocklist=("stranger",)), rows, []).train


def test_the_held_out_slice_is_the_servers_and_never_trained_on(tmp_path):
    ids = [f"r{i}" for i in range(400)]
    held = {i for i in ids if is_held_out(i, 0.2)}
    assert held == {i for i in ids if is_held_out(i, 0.2)} and 40 <= len(held) <= 120  # stable, about the share
    rows = [row for rid in ids for row in _rows([(rid, f"Question {rid}?", f"answer {rid}", "stop", "up", "", rid)],
                                                held_out=rid in held)]
    data = build_dataset(_config(tmp_path), rows, [])
    assert {e.exchange_id for e in data.held_out} == held
    assert not held & {e.exchange_id for e in data.train}


def test_one_rater_cannot_dominate(tmp_path):
    rows = _rows([(f"m{i}", f"Q{i}?", f"a{i}", "stop", "up", "", "mallory") for i in range(30)]
                 + [(f"o{i}", f"P{i}?", f"b{i}", "stop", "up", "", f"user{i}") for i in range(10)])
    data = build_dataset(_config(tmp_path, max_user_share=0.5), rows, [])
    assert sum(e.user_id == "mallory" for e in data.train) == 10
    assert data.dropped["user_cap"] == 20


def test_a_single_rater_still_teaches(tmp_path):
    # One person rating with `instructd feedback` (no --user): the cap has no one to protect them from.
    rows = _rows([(f"s{i}", f"Q{i}?", f"a{i}", "stop", "up" if i % 2 else "down", "", "") for i in range(30)])
    data = build_dataset(_config(tmp_path, max_user_share=0.5), rows, [])
    assert len(data.train) == 30 and not data.dropped


def test_instruction_checks():
    assert passes("all small here.", {"type": "lowercase"}) and not passes("Not so.", {"type": "lowercase"})
    assert passes("Pacific", {"type": "one_word"}) and not passes("The Pacific", {"type": "one_word"})
    assert passes("one two three", {"type": "max_words", "n": 3})
    assert not passes("a b c d", {"type": "max_words", "n": 3})
    assert passes("Bye. See you soon.", {"type": "ends_with", "phrase": "See you soon."})
    assert not passes("same\nsame\nsame\n", {"type": "answered"})


def test_earlier_held_out_feedback_becomes_history_and_older_training_data_stays_out(tmp_path):
    old = _rows([("a1", "Old question?", "old", "stop", "up", "", "u1")], held_out=True) + \
        _rows([("a2", "Old question 2?", "old 2", "stop", "up", "", "u2")])
    new = _rows([("b1", "New question?", "new", "stop", "down", "", "u3")], held_out=True) + \
        _rows([("b2", "New question 2?", "new 2", "stop", "up", "", "u4")])
    data = build_dataset(_config(tmp_path), new, old)
    assert [e.exchange_id for e in data.history] == ["a1"] and [e.exchange_id for e in data.held_out] == ["b1"]
    assert [e.exchange_id for e in data.train] == ["b2"]  # older ratings are not trained on again...
    data = build_dataset(_config(tmp_path, include_older=True), new, old)
    assert sorted(e.exchange_id for e in data.train) == ["a2", "b2"]  # ...unless asked...
    old += _rows([("a3", "Old question 3?", "poisoned", "stop", "up", "", "u5")])  # a run rejected it as poisoning
    data = build_dataset(_config(tmp_path), new, old, learnt=frozenset({"a2", "a1"}))
    # ...or learnt by the serving version, relearnt by a candidate from the base; held out stays held out
    assert sorted(e.exchange_id for e in data.train) == ["a2", "b2"] and [e.exchange_id for e in data.history] == ["a1"]


def test_what_the_serving_version_learnt_follows_its_lineage(tmp_path):
    """Through the parents whose weights it continued, up to one trained from the base; a version registered by hand
    learnt from no ratings, so nothing above it can be retrained from the base (None)."""
    def version(v, parent, **metadata):
        return SimpleNamespace(version=v, parent_version=parent, metadata=metadata)

    registry = [version(1, 0, exchange_ids=["a"], weights_from="base"), version(2, 1, exchange_ids=["a", "b"],
                weights_from="base"), version(3, 2, exchange_ids=["c"], weights_from="parent"), version(4, 0),
                version(5, 4, exchange_ids=["d"], weights_from="parent"), version(6, 2, exchange_ids=["e"])]
    replicas = Replicas(_config(tmp_path))
    replicas.primary = SimpleNamespace(adapters=lambda: (registry, 0))
    try:
        assert [replicas.learnt(v) for v in range(7)] == [
            frozenset(), {"a"}, {"a", "b"}, {"a", "b", "c"}, None, None, {"a", "b", "e"}]
    finally:
        replicas.close()
