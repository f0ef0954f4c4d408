"""What durability and identity cost, measured side by side in one run on fresh servers, all up at once and taking
turns (rounds alternate between them, so a slow minute of the machine falls on all alike; medians reported):

- streaming: 64 chats x 128 tokens, 16 at a time, greedy, as an application with a key would ask; the default
  server (each exchange committed before its answer, every call authenticated) against one that answers before
  committing (fire-and-forget, as instructd logged before) and one with auth off. The commit's own cost is also read
  from the default server's histogram of the wait (instructd_exchange_commit_wait_seconds);
- ratings: acknowledged (committed) ratings per second from 64 concurrent callers, against the same server
  answering health checks (a unary call that does nothing) from 64 concurrent callers.

\b
Example:
    .venv/bin/python -m benchmarks.serving             # about 15 minutes on 2 CPU cores
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from instructd.client import requests as build
from instructd.client.local import LocalServer
from instructd.v1 import instructd_pb2_grpc as pb_grpc

from .loop import _environment
from .report import write_results

CHATS, TOKENS, CONCURRENCY, CALLERS, ROUNDS = 64, 128, 16, 64, 3
DEFAULT = "default (durable, auth)"
VARIANTS = {  # name: serve options (rate limits off: the benchmark is one application asking hard)
    DEFAULT: (),
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

        started = time.perf_counter()
        await asyncio.gather(*(chat(p) for p in PROMPTS[:CHATS]))
        elapsed = time.perf_counter() - started
    return {"tokens_per_second": sum(tokens) / elapsed, "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "latency_p50_ms": 1000 * statistics.median(latencies)}


async def _per_second(target: str, call, seconds: float) -> float:
    """Calls completed per second by CALLERS concurrent callers, each making one call after another."""
    done, end = 0, time.perf_counter() + seconds

    async def caller(i: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < end:
            await call(i, n)
            n, done = n + 1, done + 1
    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(CALLERS)))
    return done / (time.perf_counter() - started)


async def _ratings_and_health(target: str, metadata, seconds: float = 8.0) -> dict:
    async with grpc.aio.insecure_channel(target) as channel:
        inference, feedback = pb_grpc.InferenceStub(channel), pb_grpc.FeedbackStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        answers = [await inference.Generate(build.generate(p, max_tokens=4), metadata=metadata) for p in PROMPTS[:8]]
        run = str(time.monotonic())  # every rating a new row, round after round
        rate = lambda i, n: feedback.Submit(build.feedback(  # noqa: E731
            answers[(i + n) % len(answers)].response_id, "up" if n % 2 else "down", user_id=f"{run}-{i}-{n}"),
            metadata=metadata)
        check = lambda i, n: health.Check(health_pb2.HealthCheckRequest())  # noqa: E731
        return {"health_checks_per_second": await _per_second(target, check, seconds),
                "ratings_per_second": await _per_second(target, rate, seconds)}


def _commit_wait(server: LocalServer) -> dict:
    """The default server's histogram of the wait for commits: its mean and the bucket its median falls in."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "instructd_exchange_commit_wait_seconds")
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    count, total = samples[(f"{family.name}_count", None)], samples[(f"{family.name}_sum", None)]
    buckets = sorted((float(le), v) for (name, le), v in samples.items() if name.endswith("_bucket"))
    median_at_most = next(le for le, v in buckets if v >= count / 2)
    return {"answers": count, "mean_ms": 1000 * total / count, "p50_at_most_ms": 1000 * median_at_most}


def measure(work: Path) -> dict:
    results: dict = {"environment": _environment(), "config": {"chats": CHATS, "tokens": TOKENS, "rounds": ROUNDS,
                                                               "concurrency": CONCURRENCY, "callers": CALLERS}}
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(LocalServer(work / f"data{i}", work / f"server{i}.log",
                                                         "--generate-per-second", "0", "--feedback-per-second", "0",
                                                         *options))
                   for i, (name, options) in enumerate(VARIANTS.items())}
        keys = {name: () if "--insecure-no-auth" in VARIANTS[name] else (("authorization", f"Bearer {s.api_key}"),)
                for name, s in servers.items()}
        rounds: dict[str, list] = {name: [] for name in VARIANTS}
        for name, server in servers.items():  # a first request each: it compiles and allocates
            asyncio.run(_warm(server.target, keys[name]))
        for r in range(ROUNDS):
            for name, server in servers.items():
                click.echo(f"round {r + 1}/{ROUNDS}: {name}: streaming...")
                rounds[name].append(asyncio.run(_streams(server.target, keys[name])))
            click.echo(f"round {r + 1}/{ROUNDS}: {DEFAULT}: ratings and health checks...")
            rounds.setdefault("ratings", []).append(asyncio.run(_ratings_and_health(servers[DEFAULT].target,
                                                                                    keys[DEFAULT])))
        results["commit_wait"] = _commit_wait(servers[DEFAULT])
    for name in VARIANTS:
        results[name] = {k: statistics.median(r[k] for r in rounds[name]) for k in rounds[name][0]} | \
            {"rounds": rounds[name]}
    ratings = {k: statistics.median(r[k] for r in rounds["ratings"]) for k in rounds["ratings"][0]}
    results["ratings"] = ratings | {"ratio": ratings["ratings_per_second"] / ratings["health_checks_per_second"],
                                    "rounds": rounds["ratings"]}
    return results


async def _warm(target: str, metadata) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        await pb_grpc.InferenceStub(channel).Generate(build.generate(PROMPTS[0], max_tokens=TOKENS), metadata=metadata)


def report(results: dict) -> str:
    base = results[DEFAULT]
    lines = [f"Medians of {ROUNDS} alternating rounds; each round {CHATS} chats x {TOKENS} tokens, {CONCURRENCY} at a "
             "time, greedy.", "", "| server | tokens/s | vs default | p50 TTFT ms | p50 latency ms |",
             "|---|---|---|---|---|"]
    for name in VARIANTS:
        s = results[name]
        lines.append(f"| {name} | {s['tokens_per_second']:.0f} | {s['tokens_per_second'] / base['tokens_per_second']:.3f}x"
                     f" | {s['ttft_p50_ms']:.1f} | {s['latency_p50_ms']:.1f} |")
    c, r = results["commit_wait"], results["ratings"]
    lines += ["", f"The wait for the commit before an answer (default server, {c['answers']:.0f} answers): mean "
                  f"{c['mean_ms']:.2f} ms, median at most {c['p50_at_most_ms']:g} ms.", "",
              f"Ratings acknowledged (committed) from {CALLERS} callers: {r['ratings_per_second']:.0f}/s; health checks "
              f"from {CALLERS} callers: {r['health_checks_per_second']:.0f}/s; ratio {r['ratio']:.2f}."]
    return "\n".join(lines) + "\n"


@click.command(help=__doc__)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results"),
              show_default=True, help="Where serving-<date>.json and .md are written.")
def main(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="instructd-bench-") as work:
        results = measure(Path(work))
    write_results(out, "serving", results, f"# Serving: what durability and identity cost\n\n{report(results)}")
    click.echo(report(results))


if __name__ == "__main__":
    main()
