"""What durability and identity cost, measured side by side in one run on fresh servers:

- streaming: 64 chats x 128 tokens, 16 at a time, greedy, as an application with a key would ask; the
  default server (each exchange committed before its answer, every call authenticated) against one that
  answers before committing (fire-and-forget, as instructd logged before) and one with auth off;
- ratings: acknowledged (committed) ratings per second from 64 concurrent callers, against the same server
  answering health checks (a unary call that does nothing) from 64 concurrent callers.

\b
Example:
    .venv/bin/python -m benchmarks.serving             # about 6 minutes on 2 CPU cores
"""

from __future__ import annotations

import asyncio
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instructd.client import requests as build
from instructd.client.local import LocalServer
from instructd.v1 import instructd_pb2_grpc as pb_grpc

from .loop import _environment

CHATS, TOKENS, CONCURRENCY, CALLERS = 64, 128, 16, 64
VARIANTS = {  # name: serve options (rate limits off: the benchmark is one application asking hard)
    "default (durable, auth)": (),
    "fire-and-forget (auth)": ("--no-durable-answers",),
    "durable, auth off": ("--insecure-no-auth",),
}
PROMPTS = [f"Write a short story about a {animal} who learns to {skill}." for animal in
           ("cat", "dog", "fox", "owl", "bear", "whale", "crow", "frog") for skill in
           ("sing", "swim", "cook", "paint", "read", "fly", "dance", "count")]


async def _streams(target: str, metadata) -> dict:
    """64 streamed chats, 16 at a time: tokens/s, and per-chat time to first token and total latency."""
    gate, ttfts, latencies, tokens = asyncio.Semaphore(CONCURRENCY), [], [], []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def chat(prompt: str) -> None:
            async with gate:
                started, first = time.perf_counter(), None
                async for event in stub.GenerateStream(build.generate(prompt, max_tokens=TOKENS, temperature=0),
                                                       metadata=metadata):
                    if event.WhichOneof("event") == "delta" and first is None:
                        first = time.perf_counter() - started
                    elif event.WhichOneof("event") == "final":
                        tokens.append(event.final.usage.completion_tokens)
                ttfts.append(first)
                latencies.append(time.perf_counter() - started)

        await chat(PROMPTS[0])  # warm up (first request compiles and allocates)
        ttfts.clear(), latencies.clear(), tokens.clear()
        started = time.perf_counter()
        await asyncio.gather(*(chat(p) for p in PROMPTS[:CHATS]))
        elapsed = time.perf_counter() - started
    return {"tokens_per_second": sum(tokens) / elapsed, "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "latency_p50_ms": 1000 * statistics.median(latencies), "completion_tokens": sum(tokens)}


async def _rate(target: str, metadata, seconds: float = 10.0) -> dict:
    """Acknowledged ratings per second, and health checks per second, each from 64 concurrent callers."""
    async with grpc.aio.insecure_channel(target) as channel:
        inference, feedback = pb_grpc.InferenceStub(channel), pb_grpc.FeedbackStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        answers = [await inference.Generate(build.generate(p, max_tokens=4), metadata=metadata) for p in PROMPTS[:8]]

        async def run(call) -> float:
            done, end = 0, time.perf_counter() + seconds

            async def caller(i: int) -> None:
                nonlocal done
                n = 0
                while time.perf_counter() < end:
                    await call(i, n)
                    n += 1
                    done += 1
            started = time.perf_counter()
            await asyncio.gather(*(caller(i) for i in range(CALLERS)))
            return done / (time.perf_counter() - started)

        rating = lambda i, n: feedback.Submit(build.feedback(  # noqa: E731
            answers[(i + n) % len(answers)].response_id, "up" if n % 2 else "down", user_id=f"caller{i}-{n}"),
            metadata=metadata)
        check = lambda i, n: health.Check(health_pb2.HealthCheckRequest())  # noqa: E731
        health_rate = await run(check)
        ratings_rate = await run(rating)
        return {"ratings_per_second": ratings_rate, "health_checks_per_second": health_rate,
                "ratio": ratings_rate / health_rate}


def measure(work: Path) -> dict:
    results: dict = {"environment": _environment(), "config": {"chats": CHATS, "tokens": TOKENS,
                                                               "concurrency": CONCURRENCY, "callers": CALLERS}}
    for i, (name, options) in enumerate(VARIANTS.items()):
        server = LocalServer(work / f"data{i}", work / f"server{i}.log", "--generate-per-second", "0",
                             "--feedback-per-second", "0", *options)
        with server:
            metadata = () if "--insecure-no-auth" in options else (("authorization", f"Bearer {server.api_key}"),)
            click.echo(f"{name}: streaming...")
            results[name] = {"streaming": asyncio.run(_streams(server.target, metadata))}
            if i == 0:
                click.echo(f"{name}: ratings and health checks...")
                results[name]["ratings"] = asyncio.run(_rate(server.target, metadata))
        click.echo(f"  {json.dumps(results[name])}")
    return results


def report(results: dict) -> str:
    base = results["default (durable, auth)"]["streaming"]
    lines = ["| server | tokens/s | vs default | p50 TTFT ms | p50 latency ms |", "|---|---|---|---|---|"]
    for name in VARIANTS:
        s = results[name]["streaming"]
        lines.append(f"| {name} | {s['tokens_per_second']:.0f} | {s['tokens_per_second'] / base['tokens_per_second']:.3f}x"
                     f" | {s['ttft_p50_ms']:.1f} | {s['latency_p50_ms']:.1f} |")
    r = results["default (durable, auth)"]["ratings"]
    lines += ["", f"Ratings acknowledged (committed) from {CALLERS} callers: {r['ratings_per_second']:.0f}/s; health "
                  f"checks from {CALLERS} callers: {r['health_checks_per_second']:.0f}/s; ratio {r['ratio']:.2f}."]
    return "\n".join(lines) + "\n"


@click.command(help=__doc__)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results"),
              show_default=True, help="Where serving-<date>.json and .md are written.")
def main(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="instructd-bench-") as work:
        results = measure(Path(work))
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"serving-{datetime.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(f"# Serving: what durability and identity cost\n\n{report(results)}")
    click.echo(report(results))


if __name__ == "__main__":
    main()
