"""IFEval's verifiable instructions as simulated users' judge: compose prompts from base tasks and the
checkers' own instruction descriptions, judge answers strictly, and make corrected answers mechanically.

The checkers come from lm-eval (`lm_eval.tasks.ifeval`); its data set is not used. A few checkers need
NLTK data that an offline machine cannot download: `Judge.unavailable()` finds those, to be left out.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field


def _registry():
    # lm-eval tries to download NLTK's punkt_tab on import and prints the failure; it carries on without it.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from lm_eval.tasks.ifeval import instructions_registry
    return instructions_registry


def _join(text: str, tail: str) -> str:
    return f"{text.rstrip()}\n\n{tail}"


def _placeholders(text: str, n: int) -> str:
    names = ["name", "date", "place", "time", "address", "number", "company", "email", "city", "topic"]
    return _join(text, "Fill in: " + " ".join(f"[{names[i % len(names)]}]" for i in range(n)))


def _highlight(text: str, n: int) -> str:
    lines = text.split("\n")
    marked = 0
    for i, line in enumerate(lines):
        if marked < n and line.strip() and "*" not in line:
            lines[i], marked = f"*{line.strip()}*", marked + 1
    return "\n".join(lines)


def _bullets(text: str, n: int) -> str:
    sentences = [s.strip(" *-") for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip(" *-")]
    return "\n".join(f"* {s}" for s in sentences[:n]) if len(sentences) >= n else text


def _sections(text: str, spliter: str, n: int) -> str:
    paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    if len(paragraphs) < n:
        return text
    per = -(-len(paragraphs) // n)
    parts = [paragraphs[i * per:(i + 1) * per] for i in range(n)]
    return "\n\n".join(f"{spliter} {i + 1}\n" + "\n\n".join(p) for i, p in enumerate(parts) if p)


# How a user fixes an answer by hand, per instruction type (args: the checker's own arguments). Types that
# cannot be fixed mechanically are absent: their 👎 come without a correction.
CORRECTIONS: dict[str, Callable[..., str]] = {
    "change_case:english_lowercase": lambda t, **_: t.lower(),
    "change_case:english_capital": lambda t, **_: t.upper(),
    "punctuation:no_comma": lambda t, **_: t.replace(",", ""),
    "startend:end_checker": lambda t, end_phrase, **_: _join(t, end_phrase),
    "startend:quotation": lambda t, **_: f'"{t.strip()}"',
    "detectable_content:postscript": lambda t, postscript_marker, **_: _join(t, f"{postscript_marker} Thank you."),
    "detectable_format:title": lambda t, **_: f"<<{' '.join(t.split()[:3]).strip('.,:;!?*#')}>>\n\n{t}",
    "detectable_format:json_format": lambda t, **_: json.dumps({"answer": t}),
    "detectable_content:number_placeholders": lambda t, num_placeholders, **_: _placeholders(t, num_placeholders),
    "detectable_format:number_highlighted_sections": lambda t, num_highlights, **_: _highlight(t, num_highlights),
    "detectable_format:number_bullet_lists": lambda t, num_bullets, **_: _bullets(t, num_bullets),
    "detectable_format:multiple_sections": lambda t, section_spliter, num_sections, **_:
        _sections(t, section_spliter, num_sections),
    "combination:repeat_prompt": lambda t, prompt_to_repeat, **_: f"{prompt_to_repeat}\n\n{t}",
    "keywords:existence": lambda t, keywords, **_: _join(t, "Key words: " + " and ".join(keywords) + "."),
    "keywords:forbidden_words": lambda t, forbidden_words, **_:
        re.sub(r"\b(" + "|".join(map(re.escape, forbidden_words)) + r")\b", "", t, flags=re.I),
}

# Arguments that keep an instruction answerable in a short answer by a small model.
BOUNDED_ARGS: dict[str, Callable[[random.Random], dict]] = {
    "detectable_format:number_bullet_lists": lambda r: {"num_bullets": r.randint(2, 4)},
    "detectable_format:number_highlighted_sections": lambda r: {"num_highlights": r.randint(1, 2)},
    "detectable_content:number_placeholders": lambda r: {"num_placeholders": r.randint(1, 3)},
    "detectable_format:multiple_sections": lambda r: {"num_sections": r.randint(2, 3),
                                                       "section_spliter": r.choice(["Section", "SECTION"])},
    "length_constraints:number_words": lambda r: {"num_words": r.choice([20, 30, 40, 50]), "relation": "less than"},
    "length_constraints:number_paragraphs": lambda r: {"num_paragraphs": r.randint(2, 3)},
}


@dataclass(frozen=True)
class Prompt:
    """A base task with zero or more verifiable instructions appended."""

    task: str
    instructions: tuple[tuple[str, dict], ...] = ()
    """(instruction id, the checker's arguments) for each instruction."""
    text: str = ""

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(i for i, _ in self.instructions)


@dataclass
class Judge:
    """Strict IFEval judging (every instruction followed) and mechanical corrections."""

    registry: object = field(default_factory=_registry)

    def checker(self, instruction_id: str, args: dict):
        checker = self.registry.INSTRUCTION_DICT[instruction_id](instruction_id)
        checker.build_description(**args)
        return checker

    def compose(self, task: str, types: tuple[str, ...], rng: random.Random) -> Prompt:
        """`task` followed by the description of each instruction type, with arguments drawn by `rng`."""
        instructions, descriptions = [], []
        for instruction_id in types:
            checker = self.registry.INSTRUCTION_DICT[instruction_id](instruction_id)
            args = BOUNDED_ARGS.get(instruction_id, lambda _: {})(rng)
            if instruction_id == "combination:repeat_prompt":
                args = {"prompt_to_repeat": task}
            state = random.getstate()
            random.seed(rng.randrange(2**32))  # the checkers draw their free arguments from `random`
            try:
                descriptions.append(checker.build_description(**args))
            finally:
                random.setstate(state)
            instructions.append((instruction_id, {k: v for k, v in (checker.get_instruction_args() or {}).items()
                                                  if v is not None}))
        return Prompt(task, tuple(instructions), " ".join([task, *descriptions]))

    def followed(self, prompt: Prompt, answer: str) -> list[bool]:
        """One verdict per instruction (strict: the answer as it is)."""
        return [bool(answer.strip()) and self.checker(i, a).check_following(answer)
                for i, a in prompt.instructions]

    def correct(self, prompt: Prompt, answer: str) -> str | None:
        """A corrected answer that follows every instruction, or None when none can be made mechanically."""
        fixed = answer.strip()
        for instruction_id, args in prompt.instructions:
            if instruction_id not in CORRECTIONS:
                return None
            fixed = CORRECTIONS[instruction_id](fixed, **args)
        return fixed if fixed.strip() and all(self.followed(prompt, fixed)) else None

    def unavailable(self) -> dict[str, str]:
        """Instruction types whose checker fails here (e.g. NLTK data missing offline): {id: why}."""
        broken, rng = {}, random.Random(0)
        for instruction_id in self.registry.INSTRUCTION_DICT:
            try:
                self.followed(self.compose("Say hello.", (instruction_id,), rng), "Hello there. How are you?")
            except Exception as error:  # noqa: BLE001 - any failure means the type cannot be judged here
                broken[instruction_id] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return broken
