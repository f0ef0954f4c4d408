"""Writes a loop benchmark's results: loop-<date>-seed<N>.json (-quick.json for a smoke run; every number and the
configuration), a plot of accuracy per cycle, and a short markdown report with the headline table; and the results
of the benchmarks that need no plot (write_results)."""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

TARGET = {"rated_gain": 0.40, "live_up_ratio": 2.0, "minutes": 60}
"""Rated types gain at least 40 points; unrated types and plain answers are no worse than the base (the 95% interval
of the difference reaches 0 or lies above it); the final version's live 👍 rate is at least twice the base's."""
GROUPS = ("rated", "unrated", "plain")


def write_report(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = "quick" if result["config"]["quick"] else f"seed{result['config']['seed']}"  # two seeds a day, side by side
    stem = out_dir / f"loop-{datetime.date.today().isoformat()}-{kind}"
    result["headline"] = headline(result)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    _plot(result, stem.with_suffix(".png"))
    stem.with_suffix(".md").write_text(markdown(result, stem.with_suffix(".png").name))
    return stem.with_suffix(".json")


def write_results(out_dir: Path, name: str, results: dict, text: str) -> Path:
    """A benchmark's results as <name>-<date>.json (every number) and .md (`text`) in out_dir; the .md's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{name}-{datetime.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    stem.with_suffix(".md").write_text(text)
    return stem.with_suffix(".md")


def paired_interval(before: list[bool], after: list[bool], draws: int = 10_000) -> dict:
    """after − before on the same prompts, with a 95% percentile-bootstrap interval: prompts are resampled with their
    pair kept together. Seeded by the data, so the same answers always give the same interval."""
    diffs = [int(a) - int(b) for b, a in zip(before, after, strict=True)]
    if not diffs:
        return {"difference": 0.0, "low": 0.0, "high": 0.0, "prompts": 0}
    rng, n = random.Random(repr(diffs)), len(diffs)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(draws))
    return {"difference": sum(diffs) / n, "low": means[int(0.025 * draws)], "high": means[int(0.975 * draws) - 1],
            "prompts": n}


def headline(result: dict) -> dict:
    """The final serving version against the base on every held-out group, and the live 👍 rates. The base is the
    one measured beside the final version, in the same engine batches, where there is one (`base_beside`); the base
    measured before the cycles against it is the benchmark's own spread (`base_twice`): no model changed there."""
    cycles = result["cycles"]
    first, last, beside = cycles[0]["measure"], cycles[-1]["measure"], cycles[-1].get("base_beside")
    base = beside or first
    change = {g: paired_interval(base["judged"][g], last["judged"][g]) for g in GROUPS}
    twice = {g: paired_interval(first["judged"][g], beside["judged"][g]) for g in GROUPS} if beside else None
    live = {a["adapter_version"]: a["up_rate"] or 0.0 for a in result.get("live_up_rate", []) if a["up"] + a["down"]}
    final = cycles[-1]["serving"]
    ratio = live.get(final, 0.0) / live[0] if live.get(0) else None
    met = {"rated": change["rated"]["difference"] >= TARGET["rated_gain"],
           "unrated": change["unrated"]["high"] >= 0, "plain": change["plain"]["high"] >= 0,
           "live_up_ratio": ratio is not None and ratio >= TARGET["live_up_ratio"],
           "minutes": result["minutes"] <= TARGET["minutes"]}
    return {"change": change, "base_twice": twice, "live_up_ratio": ratio, "target_met": met}


def _interval(c: dict) -> str:
    return f"{c['difference']:+.1%} (95% interval {c['low']:+.1%} to {c['high']:+.1%}, {c['prompts']} prompts)"


def markdown(result: dict, plot_name: str) -> str:
    h, cfg, env = result["headline"], result["config"], result["environment"]
    rows = ["| cycle | serving | tuning run | canary | rated types | unrated types | plain |",
            "|---|---|---|---|---|---|---|"]
    for c in result["cycles"]:
        run, canary = c.get("run"), c.get("canary")
        outcome = f"{run['outcome']}" if run else "-"
        released = f"v{canary['version']} {canary['outcome']} after {len(canary['rounds'])} round(s)" if canary else "-"
        m = c["measure"]
        serving = f"v{c['serving']}" if c["serving"] else "base"
        scores = " | ".join(f"{m[g]:.1%}" if m else "not measured" for g in GROUPS)
        rows.append(f"| {c['cycle']} | {serving} | {outcome} | {released} | {scores} |")
    yes = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines = [
        f"# instructd closed loop: {env['date'][:10]}", "",
        f"{cfg['cycles']} cycle(s) of {cfg['traffic']} rated exchanges on SmolLM2-135M-Instruct, "
        f"{env['cpus']} CPU cores, {result['minutes']:.1f} min in all.", "", *rows, "",
        f"Final serving version minus base, on the same held-out prompts (seed {cfg['seed']}):", "",
        f"- Rated types: {_interval(h['change']['rated'])}; target at least +40 points: "
        f"{yes(h['target_met']['rated'])}",
        f"- Unrated types: {_interval(h['change']['unrated'])}; target no worse (interval reaches 0 or above): "
        f"{yes(h['target_met']['unrated'])}",
        f"- Plain instructions: {_interval(h['change']['plain'])}; target no worse: {yes(h['target_met']['plain'])}",
        f"- Live 👍 rate, final version over base: "
        f"{'n/a' if h['live_up_ratio'] is None else format(h['live_up_ratio'], '.2f') + '×'}; target at least 2×: "
        f"{yes(h['target_met']['live_up_ratio'])}",
        f"- Time: {result['minutes']:.1f} min (target under 60: {yes(h['target_met']['minutes'])})", "",
        *([f"The base is the one measured beside the final version, in the same engine batches. The base measured "
           f"before the cycles against it (no model changed; the benchmark's own spread): "
           + "; ".join(f"{g} {_interval(h['base_twice'][g])}" for g in GROUPS), ""] if h.get("base_twice") else []),
        "Strict prompt-level accuracy (every constraint followed) on held-out prompts never sent as traffic, "
        "greedy, through the gRPC API; plain = complete, on-topic, non-looping answers to plain instructions.", "",
        f"![accuracy per cycle]({plot_name})", "",
        "| tuning run | outcome | examples | loss | why |", "|---|---|---|---|---|",
        *[f"| {c['run']['run_id']} | {c['run']['outcome']} v{c['run']['candidate_version']} | "
          f"{c['run']['examples']} | {c['run']['final_loss']:.3f} | {c['run']['reason']} |"
          for c in result["cycles"] if c.get("run")], "",
        *[f"- Canary of cycle {c['cycle']}: {c['canary']['summary']}" for c in result["cycles"] if c.get("canary")],
        "",
        "Live 👍 rate per adapter version (the service's own stats; versions with ratings): " + ", ".join(
            f"{'v' + str(a['adapter_version']) if a['adapter_version'] else 'base'} "
            f"{(a['up_rate'] or 0):.0%} of {a['up'] + a['down']}"
            for a in result.get("live_up_rate", []) if a["up"] + a["down"]), "",
    ]
    if result["unavailable_types"]:
        lines.append("Instruction types left out (their checker cannot run here): "
                     + ", ".join(sorted(result["unavailable_types"])))
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [c for c in result["cycles"] if c["measure"]]
    cycles = [c["cycle"] for c in measured]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, label in (("rated", "rated instruction types"), ("unrated", "unrated types (zero-shot)"),
                       ("plain", "plain instructions (quality)")):
        ax.plot(cycles, [100 * c["measure"][key] for c in measured], marker="o", label=label)
    ax.set_xlabel("tuning cycle (0: base model)")
    ax.set_ylabel("accuracy on held-out prompts (%)")
    ax.set_xticks(cycles)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("instructd: SmolLM2-135M learning from simulated users")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
