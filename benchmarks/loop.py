"""The closed loop, measured: simulated users send instructions with verifiable constraints to a fresh
instructd, rate every answer by IFEval's checkers (👍 only if all constraints are followed, sometimes
with a mechanically corrected answer), the service's own tuner learns from those ratings, and held-out prompts
measure the base and the version serving after the last cycle (after every cycle with --measure-every-cycle),
and the base again beside the last, in the same engine batches: strict accuracy on rated types, on types no user
ever rated, and the quality of plain answers. A candidate that
passes the gate serves a canary, as by default: the same users go on asking and rating, and their ratings of its
answers promote or roll it back. Everything goes through the public gRPC API.

\b
Example:
    .venv/bin/python -m benchmarks.loop --seed 0   # full run: 3 cycles, canaries included
    .venv/bin/python -m benchmarks.loop --quick    # smoke run (1 cycle, few prompts), 11-19 min on 2 CPU cores
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import platform
import random
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from instructd.client import Client
from instructd.client.local import LocalServer

from .ifeval import Judge, Prompt
from .report import write_report
from .tasks import HELD_OUT, PLAIN, TRAFFIC

# Users rate answers to these instruction types...
RATED = ("change_case:english_lowercase", "change_case:english_capital", "punctuation:no_comma",
         "startend:end_checker", "detectable_format:json_format", "combination:repeat_prompt", "keywords:existence")
# ...and never see these: accuracy on them measures zero-shot generalisation.
UNRATED = ("startend:quotation", "detectable_content:postscript", "detectable_format:constrained_response",
           "detectable_format:number_bullet_lists", "keywords:frequency", "length_constraints:number_paragraphs")
# Requests the benchmark has in flight at once. A full run measures 340 prompts: all at once, those past the server's
# admission limit (256) were refused for longer than the client's retries wait. 32 keep the engine's batches full.
AT_ONCE = 32
# A measured answer's deadline. Plain answers may run to 1024 tokens, and with an adapter serving, 32 of them at once
# on 2 CPU cores ran past the client's default of 300 s.
MEASURE_TIMEOUT = 1800.0


@dataclass(frozen=True)
class LoopConfig:
    cycles: int = 3
    traffic: int = 240
    """Rated exchanges per cycle."""
    held_out_per_type: int = 20
    """Measured prompts per instruction type (rated and unrated), from tasks never sent as traffic."""
    plain: int = len(PLAIN)
    two_instruction_share: float = 0.3
    """Share of prompts that carry two instructions instead of one."""
    correction_share: float = 0.5
    """Share of 👎 answers for which the user writes a corrected answer (when one can be made mechanically)."""
    users: int = 400
    """Distinct simulated users; a hash of the user id decides who sees a canary."""
    canary_share: float = 0.25
    """The server's --canary-share (its default, 0.1, needs about 300 ratings to reach 30 of the candidate's)."""
    canary_traffic: int = 120
    """Rated exchanges per round while a canary runs; rounds go on until it ends or `canary_rounds` have passed."""
    canary_rounds: int = 3
    temperature: float = 0.7
    """Sampling of served answers during traffic (measurement is greedy)."""
    max_tokens: int = 320
    plain_max_tokens: int = 1024
    """Room for a complete answer to a plain instruction (one that does not stop by then counts as failed)."""
    tuner_args: tuple[str, ...] = ()
    """Extra `instructd tuner` options (the defaults are the tuner's own)."""
    seed: int = 0
    quick: bool = False
    measure_every_cycle: bool = False
    """Measure the version serving after every cycle, not only after the last (a measurement with an adapter
    serving took about 15 min on 2 CPU cores; the live 👍 rate per version is reported either way)."""


QUICK = LoopConfig(cycles=1, traffic=60, held_out_per_type=2, plain=8, canary_traffic=30, canary_rounds=1, quick=True,
                   tuner_args=("--steps", "10", "--rehearsal", "8"))


class Loop:
    def __init__(self, config: LoopConfig, server: LocalServer, judge: Judge, rated: tuple, unrated: tuple) -> None:
        self.config, self.server, self.judge = config, server, judge
        self.rated, self.unrated = rated, unrated
        rng = random.Random(config.seed)
        self.measure_rated = self._prompts(HELD_OUT, rated, len(rated) * config.held_out_per_type, rng)
        self.measure_unrated = self._prompts(HELD_OUT, unrated, len(unrated) * config.held_out_per_type, rng)
        self.measure_plain = PLAIN[: config.plain]
        self.rng = rng
        with server.client() as admin:  # the simulated users and the measurement are two applications
            self.keys = {app: admin.create_key(f"bench-{app}", "app")[1] for app in ("users", "measure")}

    def _prompts(self, tasks: list[str], types: tuple, count: int, rng: random.Random) -> list[Prompt]:
        """`count` prompts; every type leads equally often; some carry a second, compatible type."""
        prompts = []
        for i in range(count):
            chosen = [types[i % len(types)]]
            if rng.random() < self.config.two_instruction_share:
                compatible = [t for t in types if not self._conflict(chosen[0], t)]
                if compatible:
                    chosen.append(rng.choice(compatible))
            prompts.append(self.judge.compose(rng.choice(tasks), tuple(chosen), rng))
        return prompts

    def _conflict(self, a: str, b: str) -> bool:
        conflicts = self.judge.registry.INSTRUCTION_CONFLICTS
        return a == b or b in conflicts.get(a, ()) or a in conflicts.get(b, ())

    async def traffic(self, label: str, count: int) -> dict:
        """`count` users ask, read, rate; returns tallies."""
        c = self.config
        prompts = self._prompts(TRAFFIC, self.rated, count, self.rng)
        tally = {"exchanges": 0, "up": 0, "down": 0, "corrections": 0, "by_version": {}}
        async with self.server.async_client(self.keys["users"]) as client:
            at_once = asyncio.Semaphore(AT_ONCE)

            async def one(i: int, prompt: Prompt) -> None:
                # Draws of its own, per prompt: answers arrive in any order, and a shared generator drawn from after
                # an await would give each prompt a different user and coin from run to run.
                rng = random.Random(f"{c.seed}/{label}/{i}")
                user = f"user{rng.randrange(c.users)}"
                async with at_once:
                    answer = await client.generate(prompt.text, temperature=c.temperature, max_tokens=c.max_tokens,
                                                   seed=rng.randrange(2**31), user_id=user)
                good = all(self.judge.followed(prompt, answer.text))
                correction = None
                if not good and answer.finish_reason == "stop" and rng.random() < c.correction_share:
                    correction = self.judge.correct(prompt, answer.text)
                await client.feedback(answer.response_id, "up" if good else "down", correction=correction or "",
                                      user_id=user)
                tally["exchanges"] += 1
                tally["up" if good else "down"] += 1
                tally["corrections"] += correction is not None
                per_version = tally["by_version"].setdefault(str(answer.adapter_version), {"up": 0, "down": 0})
                per_version["up" if good else "down"] += 1
                bar.update()

            with tqdm(total=len(prompts), desc=f"{label}: users ask and rate", unit="answer") as bar:
                await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return tally

    def canary(self, client: Client, cycle: int) -> dict | None:
        """While a canary runs, rounds of users ask and rate (some of them see the candidate) until it ends; what
        happened to it."""
        c, rounds, state = self.config, [], client.canary()
        if state is None:
            return None
        version = state.version
        for round_ in range(1, c.canary_rounds + 1):
            rounds.append(asyncio.run(self.traffic(f"cycle {cycle} canary {round_}", c.canary_traffic)))
            time.sleep(2)  # the server looks at its canary every second
            if (now := client.canary()) is None:
                break
            state = now
        status = next(a.status for a in client.adapters()[0] if a.version == version)
        # The server's own tally ends with the canary, so the summary counts what the users saw in its rounds.
        return {"version": version, "rounds": rounds, "outcome": status, "last_seen": asdict(state),
                "summary": f"{status} after {len(rounds)} round(s) of {c.canary_traffic} rated exchanges; in them "
                           f"v{version} got {_ups(rounds, version)}, v{state.incumbent_version} "
                           f"{_ups(rounds, state.incumbent_version)}"}

    async def measure(self, label: str, versions: tuple[int, ...], base_plain: list[str] | None = None) -> list[dict]:
        """Greedy answers from each version to every held-out prompt, judged; one result per version. The versions
        are named (a request without one may be drawn into a canary) and asked side by side, prompt by prompt, so
        their answers share the engine's batches: greedy answers on CPU depend on the batch
        (benchmarks/determinism.py), and what the batch does to one version it does to the other."""
        c = self.config
        prompts = self.measure_rated + self.measure_unrated
        plain_tasks = [task for task, _ in self.measure_plain]
        async with self.server.async_client(self.keys["measure"], timeout=MEASURE_TIMEOUT) as client:
            total = (len(prompts) + len(plain_tasks)) * len(versions)
            with tqdm(total=total, desc=f"{label}: measuring", unit="answer") as bar:
                at_once = asyncio.Semaphore(AT_ONCE)

                async def ask(text: str, version: int) -> Measured:
                    async with at_once:
                        answer = await client.generate(text, adapter=version or "base", temperature=0,
                                                       max_tokens=c.max_tokens)
                    bar.update()
                    return Measured(answer.text, answer.finish_reason, answer.adapter_version)

                async def ask_plain(text: str, version: int) -> Measured:
                    async with at_once:
                        answer = await answer_until_it_loops(client, text, version, c.plain_max_tokens)
                    bar.update()
                    return answer
                asked = [*(ask(p.text, v) for p in prompts for v in versions),
                         *(ask_plain(t, v) for t in plain_tasks for v in versions)]
                answers = await asyncio.gather(*asked)
        return [self._judged(answers[i::len(versions)], base_plain) for i in range(len(versions))]

    def _judged(self, answers: list[Measured], base_plain: list[str] | None) -> dict:
        """One version's answers to the held-out prompts (rated, unrated, then plain), judged."""
        prompts = self.measure_rated + self.measure_unrated
        versions = {a.adapter_version for a in answers if a.finish_reason != LOOPED}
        judged = [all(self.judge.followed(p, a.text)) for p, a in zip(prompts, answers)]
        rated, unrated = judged[: len(self.measure_rated)], judged[len(self.measure_rated):]
        plain_answers = answers[len(prompts):]
        plain_ok = [plain_quality(a.text, a.finish_reason, keyword) for a, (_, keyword) in
                    zip(plain_answers, self.measure_plain)]
        return {
            "adapter_versions": sorted(versions),
            "rated": _share(rated), "unrated": _share(unrated), "plain": _share(plain_ok),
            "judged": {"rated": rated, "unrated": unrated, "plain": plain_ok},  # per prompt, for paired intervals
            "rated_by_type": _by_type(self.measure_rated, rated),
            "unrated_by_type": _by_type(self.measure_unrated, unrated),
            "plain_same_as_base": (_share([a.text.strip() == b.strip() for a, b in zip(plain_answers, base_plain)])
                                   if base_plain else 1.0),
            "plain_answers": [a.text for a in plain_answers],
            "samples": [{"prompt": p.text, "answer": a.text, "followed": j}
                        for p, a, j in list(zip(prompts, answers, judged))[:: max(1, len(prompts) // 12)]],
        }


@dataclass(frozen=True)
class Measured:
    text: str
    finish_reason: str
    """As the server said, or LOOPED: the benchmark stopped reading once the answer's verdict could only be a loop."""
    adapter_version: int | None


LOOPED = "looped"


async def answer_until_it_loops(client, text: str, serving: int, max_tokens: int) -> Measured:
    """A plain answer, streamed, and cancelled as soon as one of its finished sentences has come three times:
    plain_quality fails it whatever follows (those sentences stay in the whole answer), and loops run to max_tokens,
    most of a measurement's time otherwise."""
    parts = []
    async with contextlib.aclosing(client.stream(text, adapter=serving or "base", temperature=0,
                                                 max_tokens=max_tokens)) as events:
        async for event in events:
            if not isinstance(event, str):
                return Measured(event.text, event.finish_reason, event.adapter_version)
            parts.append(event)
            if "\n" in event or any(mark in event for mark in ".!?"):
                if _loops(_sentences("".join(parts))[:-1]):  # the last may still grow
                    return Measured("".join(parts), LOOPED, None)
    raise RuntimeError("the stream ended without its final answer")


def plain_quality(text: str, finish_reason: str, keyword: str) -> bool:
    """A plain instruction is answered well enough if the answer is complete (the model stopped by itself),
    on topic (it names the task's subject), and not degenerate (no sentence repeated three times)."""
    return (finish_reason == "stop" and keyword.lower() in text.lower() and len(text.split()) >= 10
            and not _loops(_sentences(text)))


def _sentences(text: str) -> list[str]:
    return [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def _loops(sentences: list[str]) -> bool:
    return max((sentences.count(s) for s in sentences), default=0) >= 3


def _ups(rounds: list[dict], version: int) -> str:
    """👍 of all ratings the users gave `version`'s answers in these rounds of traffic."""
    up, down = (sum(r["by_version"].get(str(version), {}).get(k, 0) for r in rounds) for k in ("up", "down"))
    return f"👍 {up}/{up + down}"


def _share(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def _by_type(prompts: list[Prompt], judged: list[bool]) -> dict[str, float]:
    """Strict accuracy of the prompts whose first (leading) instruction is each type."""
    groups: dict[str, list[bool]] = {}
    for p, ok in zip(prompts, judged):
        groups.setdefault(p.types[0], []).append(ok)
    return {t: _share(v) for t, v in sorted(groups.items())}


def instruction_types(judge: Judge) -> tuple[dict, tuple, tuple]:
    """The types whose checker cannot run here (with why), and the rated and unrated types that can."""
    missing = judge.unavailable()
    return (missing, tuple(t for t in RATED if t not in missing), tuple(t for t in UNRATED if t not in missing))


def wait_for_run(client: Client, after_id: int, timeout: float) -> dict:
    """Follows the tuner's run after `after_id` (it runs in another process) until it ends; its summary."""
    run = client.follow_run(after_id, timeout)
    as_dict = lambda m: MessageToDict(m, preserving_proto_field_name=True) if m else {}  # noqa: E731
    return {"run_id": run.id, "outcome": run.status, "candidate_version": run.candidate_version,
            "examples": run.examples, "final_loss": run.loss, "reason": run.reason, "verdict": as_dict(run.verdict),
            "data": as_dict(run.data)}


def run_loop(config: LoopConfig, out_dir: Path, work_dir: Path) -> Path:
    started = time.monotonic()
    judge = Judge()
    missing, rated, unrated = instruction_types(judge)
    # No rate limits: the simulated users of a cycle all ask at once, which is the benchmark's doing, not theirs.
    server = LocalServer(work_dir / "data", work_dir / "server.log", "--generate-per-second", "0",
                         "--feedback-per-second", "0", "--canary", "auto", "--canary-share", str(config.canary_share))
    tuner_log = open(work_dir / "tuner.log", "a")
    result: dict = {"config": {**asdict(config), "rated_types": rated, "unrated_types": unrated},
                    "unavailable_types": missing, "environment": _environment(), "cycles": []}
    with server:
        with server.client() as admin:  # the tuner as a pure API client: a tuner key and a directory of its own
            tuner_key = admin.create_key("instructd-tuner", "tuner")[1]
        tuner = subprocess.Popen(server.tuner_command("--min-new-ratings", "1000000000", *config.tuner_args),
                                 stdout=tuner_log, stderr=subprocess.STDOUT, env=server.env(tuner_key))
        try:
            loop = Loop(config, server, judge, rated, unrated)
            (base,) = asyncio.run(loop.measure("base", (0,)))
            result["cycles"].append({"cycle": 0, "serving": 0, "measure": base, "seconds": time.monotonic() - started})
            with server.client() as client:
                for cycle in range(1, config.cycles + 1):
                    t0 = time.monotonic()
                    tally = asyncio.run(loop.traffic(f"cycle {cycle}", config.traffic))
                    last = max((r.id for r in client.tuning_status(limit=1).runs), default=0)
                    client.trigger_tuning()
                    run = wait_for_run(client, last, timeout=3600)
                    canary = loop.canary(client, cycle)
                    _, serving = client.adapters()
                    measured = beside = None
                    if cycle == config.cycles or config.measure_every_cycle:
                        # The last time with the base beside it, in the same batches: the headline's pairs.
                        versions = (serving, 0) if cycle == config.cycles and serving else (serving,)
                        measured, *rest = asyncio.run(loop.measure(f"cycle {cycle}", versions, base["plain_answers"]))
                        beside = rest[0] if rest else None
                    result["cycles"].append({"cycle": cycle, "serving": serving, "traffic": tally, "run": run,
                                             "canary": canary, "measure": measured, "base_beside": beside,
                                             "seconds": time.monotonic() - t0})
                    click.echo(f"cycle {cycle}: run {run['outcome']} ({run['reason']}); "
                               f"canary {canary['summary'] if canary else 'none'}; serving v{serving}"
                               + (f"; rated {measured['rated']:.0%} unrated {measured['unrated']:.0%} "
                                  f"plain {measured['plain']:.0%}" if measured else ""))
                stats = client.stats()
                result["live_up_rate"] = [{"adapter_version": a.adapter_version, "exchanges": a.exchanges,
                                           "up": a.ratings_up, "down": a.ratings_down, "up_rate": a.up_rate}
                                          for a in stats.adapters]
        finally:
            tuner.terminate()
            tuner.wait(timeout=60)
    result["minutes"] = (time.monotonic() - started) / 60
    return write_report(result, out_dir)


def _environment() -> dict:
    import torch
    import vllm
    return {"cpus": os.cpu_count(), "cpu": _cpu_model(), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "vllm": vllm.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _cpu_model() -> str:
    """The CPU's model name (Linux): two runs of one recipe on one seed differed; the CPU may be why."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


@click.command(help=__doc__)
@click.option("--quick", is_flag=True, help="Smoke run: one cycle, few prompts, a short training run.")
@click.option("--cycles", type=int, help="Tuning cycles (default 3; 1 with --quick).")
@click.option("--traffic", type=int, help="Rated exchanges per cycle (default 240; 60 with --quick).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results"),
              show_default=True, help="Where loop-<date>-seed<N>.json, .png and .md are written.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The service's data directory and logs (default: a fresh temporary folder, removed after).")
@click.option("--tuner-arg", multiple=True, help="Extra `instructd tuner` option, e.g. --tuner-arg=--steps=60.")
@click.option("--seed", default=0, show_default=True)
@click.option("--measure-every-cycle", is_flag=True,
              help="Measure the serving version after every cycle, not only the base and the last.")
def main(quick, cycles, traffic, out, work_dir, tuner_arg, seed, measure_every_cycle) -> None:
    config = QUICK if quick else LoopConfig()
    changes = {k: v for k, v in {"cycles": cycles, "traffic": traffic, "seed": seed}.items() if v is not None}
    if measure_every_cycle:
        changes["measure_every_cycle"] = True
    if tuner_arg:
        changes["tuner_args"] = (*config.tuner_args, *tuner_arg)
    config = LoopConfig(**{**asdict(config), **changes})
    if work_dir:
        work_dir.mkdir(parents=True, exist_ok=True)
        path = run_loop(config, out, work_dir.resolve())
    else:
        temp = Path(tempfile.mkdtemp(prefix="instructd-bench-"))
        try:
            path = run_loop(config, out, temp)
        except BaseException:
            click.echo(f"benchmark failed; the service's logs are kept in {temp}", err=True)
            raise
        shutil.rmtree(temp, ignore_errors=True)
    click.echo(f"report: {path.with_suffix('.md')}\n" + path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
