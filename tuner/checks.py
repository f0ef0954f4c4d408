"""Machine-checkable instructions: each check says whether an answer followed its instruction."""

from __future__ import annotations

import re
from collections.abc import Callable

_WORD = re.compile(r"[A-Za-z0-9']+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def lowercase(text: str, **_) -> bool:
    return text.strip() != "" and text == text.lower() and any(c.isalpha() for c in text)


def uppercase(text: str, **_) -> bool:
    return text.strip() != "" and text == text.upper() and any(c.isalpha() for c in text)


def max_words(text: str, n: int, **_) -> bool:
    return 0 < len(_words(text)) <= n


def one_word(text: str, **_) -> bool:
    return len(_words(text)) == 1


def no_commas(text: str, **_) -> bool:
    return text.strip() != "" and "," not in text


def contains(text: str, word: str, **_) -> bool:
    return word.lower() in text.lower()


def ends_with(text: str, phrase: str, **_) -> bool:
    return text.strip().endswith(phrase)


def repetition(text: str) -> float:
    """Share of the word 3-grams that repeat an earlier one (0 for under 10 of them): high in a loop."""
    words = text.lower().split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return 1 - len(set(grams)) / len(grams) if len(grams) >= 10 else 0.0


def answered(text: str, **_) -> bool:
    """Plain instructions: a real answer, not empty, not stuck repeating one line or phrases (a loop)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (len(_words(text)) >= 3 and max((lines.count(line) for line in lines), default=0) < 3
            and repetition(text) <= 0.3)


CHECKS: dict[str, Callable[..., bool]] = {f.__name__: f for f in (
    lowercase, uppercase, max_words, one_word, no_commas, contains, ends_with, answered)}


def passes(text: str, check: dict) -> bool:
    """`check` is {"type": name, **arguments}, e.g. {"type": "max_words", "n": 20}."""
    args = dict(check)
    return CHECKS[args.pop("type")](text, **args)
