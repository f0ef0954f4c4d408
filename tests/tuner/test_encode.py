"""Training sequences: the loss falls on the answer only, and a long example keeps its instruction in view."""

from __future__ import annotations

from transformers import AutoTokenizer

from instructd.tuner.dataset import Example
from instructd.tuner.train import encode


def test_long_answers_lose_their_end_not_the_instruction(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = "Describe the sea. Answer in all lowercase letters."
    example = Example("x", (("user", prompt),), "the sea is wide. " * 200, desirable=True)
    ids, labels = encode(tokenizer, example, max_length=128)
    assert len(ids) == len(labels) == 128
    text = tokenizer.decode(ids)
    assert "Answer in all lowercase letters." in text and "<|im_end|>" not in text.split("assistant")[-1]
    answer_start = labels.index(next(label for label in labels if label != -100))
    assert all(label == -100 for label in labels[:answer_start])
    assert tokenizer.decode(ids[answer_start:]).startswith("the sea is wide.")

    short = Example("y", (("user", prompt),), "the sea is wide.", desirable=True)
    ids, labels = encode(tokenizer, short, max_length=128)
    assert tokenizer.decode([t for t in labels if t != -100]).startswith("the sea is wide.")
    assert ids[-len([t for t in labels if t != -100]):] == [t for t in labels if t != -100]
