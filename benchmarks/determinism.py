"""How far one version's greedy answers move between measurements: the noise floor under every difference the loop
and recipe benchmarks report. The base model answers the loop benchmark's plain instructions greedily, as the loop
measures them, twice with as many in flight as the loop keeps (AT_ONCE) and twice one at a time (the first few);
it counts identical answers and changed plain-quality verdicts between the runs.

\b
Example:
    .venv/bin/python -m benchmarks.determinism          # about 6 minutes on 2 CPU cores
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import click

from instructd.client.local import LocalServer

from .loop import AT_ONCE, MEASURE_TIMEOUT, _environment, answer_until_it_loops, plain_quality
from .report import write_results
from .tasks import PLAIN

PROMPTS, ALONE, MAX_TOKENS = 32, 8, 512


async def answers(server: LocalServer, prompts: list[tuple[str, str]], at_once: int) -> list[dict]:
    """Each prompt's greedy answer from the base, with `at_once` in flight, and whether it passes plain_quality."""
    limit = asyncio.Semaphore(at_once)
    async with server.async_client(timeout=MEASURE_TIMEOUT) as client:
        async def one(text: str, keyword: str) -> dict:
            async with limit:
                answer = await answer_until_it_loops(client, text, 0, MAX_TOKENS)
            return {"text": answer.text, "passed": plain_quality(answer.text, answer.finish_reason, keyword)}
        return await asyncio.gather(*(one(text, keyword) for text, keyword in prompts))


def compare(a: list[dict], b: list[dict]) -> dict:
    """Identical answers and changed verdicts between two runs over the same prompts."""
    return {"prompts": len(a), "identical": sum(x["text"] == y["text"] for x, y in zip(a, b)),
            "verdicts_changed": sum(x["passed"] != y["passed"] for x, y in zip(a, b))}


def measure(work_dir: Path) -> dict:
    prompts = list(PLAIN[:PROMPTS])
    runs = {}
    with LocalServer(work_dir / "data", work_dir / "server.log", "--generate-per-second", "0", "--no-tuner") as server:
        for name, at_once, count in (("batched 1", AT_ONCE, PROMPTS), ("batched 2", AT_ONCE, PROMPTS),
                                     ("alone 1", 1, ALONE), ("alone 2", 1, ALONE)):
            click.echo(f"{name}: {count} answers, {at_once} at a time...")
            runs[name] = asyncio.run(answers(server, prompts[:count], at_once))
    return {"environment": _environment(),
            "config": {"prompts": PROMPTS, "alone": ALONE, "max_tokens": MAX_TOKENS, "at_once": AT_ONCE},
            "batched twice": compare(runs["batched 1"], runs["batched 2"]),
            "alone twice": compare(runs["alone 1"], runs["alone 2"]),
            "batched against alone": compare(runs["batched 1"][:ALONE], runs["alone 1"]),
            "runs": runs}


def report(results: dict) -> str:
    rows = "\n".join(f"| {name} | {results[name]['prompts']} | {results[name]['identical']} | "
                     f"{results[name]['verdicts_changed']} |"
                     for name in ("batched twice", "alone twice", "batched against alone"))
    env = results["environment"]
    return (f"The base model's greedy answers to the loop benchmark's plain instructions (up to {MAX_TOKENS} tokens), "
            f"{AT_ONCE} in flight or one at a time; {env['cpus']} cores ({env['cpu']}), vLLM {env['vllm']}.\n\n"
            "| runs compared | prompts | identical answers | plain-quality verdicts changed |\n|---|---|---|---|\n"
            f"{rows}\n")


@click.command(help=__doc__)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results"),
              show_default=True, help="Where determinism-<date>.json and .md are written.")
def main(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="instructd-determinism-") as work:
        results = measure(Path(work))
    write_results(out, "determinism", results, f"# Determinism: one version measured twice\n\n{report(results)}")
    click.echo(report(results))


if __name__ == "__main__":
    main()
