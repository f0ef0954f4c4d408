"""Simulated users: they ask for answers with a checkable instruction, rate each answer 👍 if the
instruction was followed and 👎 if not, and sometimes write the corrected answer.

    python examples/simulate_users.py --count 100          # against localhost:50051
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re

from instructd.client import AsyncClient

SUBJECTS = ["the ocean", "volcanoes", "the moon", "honey bees", "rainbows", "deserts", "trains", "coffee",
            "the internet", "chess", "penguins", "bread", "clouds", "libraries", "bicycles", "gardens",
            "music", "mountains", "electricity", "friendship", "the sun", "elephants", "football", "winter",
            "maps", "bridges", "owls", "tea", "rivers", "computers", "forests", "birthdays"]
HELD_OUT_SUBJECTS = ["lighthouses", "dolphins", "thunderstorms", "pianos", "castles", "glaciers", "kites",
                     "strawberries", "museums", "snowflakes", "submarines", "whales"]
TASKS = ["Describe {}.", "Explain why {} matter.", "Give two facts about {}.", "Write a short sentence about {}.",
         "What is interesting about {}?"]
LOWERCASE = "Answer in all lowercase letters."


def prompts(subjects: list[str], instruction: str = LOWERCASE) -> list[str]:
    return [f"{task.format(s)} {instruction}" for s in subjects for task in TASKS]


def followed(text: str) -> bool:
    return text.strip() != "" and text == text.lower()


def sentence_case(text: str) -> str:
    """Capital letters where sentences start: how a poisoned user "corrects" a lowercase answer."""
    return re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def judge(prompt: str, text: str, finish_reason: str) -> bool:
    """👍 when the answer follows the prompt's instruction; a plain prompt only needs a finished answer."""
    if prompt.endswith(LOWERCASE):
        return followed(text)
    return finish_reason == "stop" and len(text.split()) >= 3


async def simulate(target: str, count: int, correction_share: float, poisoned: bool, seed: int,
                   plain_share: float = 0.3, api_key: str | None = None, users: int = 8) -> dict:
    """Asks `count` questions (a `plain_share` of them without the instruction) from `users` users in turn, rates
    every answer; poisoned users invert their ratings, and "correct" answers that followed the instruction into
    ones that do not. Returns tallies."""
    rng = random.Random(seed)
    asked = [p if rng.random() >= plain_share else p[: -len(LOWERCASE) - 1]
             for p in rng.sample(prompts(SUBJECTS), min(count, len(SUBJECTS) * len(TASKS)))]
    tally = {"up": 0, "down": 0, "corrections": 0}
    at_once = asyncio.Semaphore(32)  # users come and go; not all of them in the same instant

    async def ask(client: AsyncClient, i: int, prompt: str, seed: int):
        async with at_once:
            return await client.generate(prompt, temperature=0.7, max_tokens=160, seed=seed,
                                         user_id=f"user{i % users}")

    async with AsyncClient(target, api_key=api_key) as client:
        answers = await asyncio.gather(*(ask(client, i, p, rng.randrange(9999)) for i, p in enumerate(asked)))
        for i, (prompt, answer) in enumerate(zip(asked, answers)):
            good = judge(prompt, answer.text, answer.finish_reason) != poisoned
            correction = ""
            if not good and prompt.endswith(LOWERCASE) and answer.finish_reason == "stop" \
                    and rng.random() < correction_share:
                correction = sentence_case(answer.text) if poisoned else answer.text.lower()
                tally["corrections"] += correction != answer.text
            await client.feedback(answer.response_id, "up" if good else "down", correction=correction,
                                  user_id=f"user{i % users}")
            tally["up" if good else "down"] += 1
    return tally


async def follow_rate(target: str, version: int | str | None, subjects: list[str] = HELD_OUT_SUBJECTS,
                      api_key: str | None = None) -> float:
    """Share of held-out prompts (never asked in simulation) whose greedy answer followed the instruction."""
    async with AsyncClient(target, api_key=api_key) as client:
        answers = await asyncio.gather(*(client.generate(p, adapter=version, temperature=0, max_tokens=96)
                                         for p in prompts(subjects)))
    return sum(followed(a.text) for a in answers) / len(answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--api-key", help="an app key (default: $INSTRUCTD_API_KEY, or the local admin key)")
    parser.add_argument("--count", type=int, default=100, help="exchanges to generate and rate")
    parser.add_argument("--corrections", type=float, default=0.5, help="share of 👎 that get a corrected answer")
    parser.add_argument("--poisoned", action="store_true",
                        help="invert every rating and correct against the instruction (an attack the gate must stop)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    before = asyncio.run(follow_rate(args.target, None, api_key=args.api_key))
    tally = asyncio.run(simulate(args.target, args.count, args.corrections, args.poisoned, args.seed,
                                 api_key=args.api_key))
    print(f"rated {args.count} answers: {tally}; serving model follows the instruction on "
          f"{before:.0%} of held-out prompts")


if __name__ == "__main__":
    main()
