"""Writes a loop benchmark's results: loop-<date>.json (every number and the configuration), a plot of
accuracy per cycle, and a short markdown report with the headline table."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

TARGET = {"rated_gain": 0.25, "unrated_gain": 0.0, "plain_loss": 0.02, "minutes": 45}


def write_report(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"loop-{datetime.date.today().isoformat()}{'-quick' if result['config']['quick'] else ''}"
    result["headline"] = headline(result)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    _plot(result, stem.with_suffix(".png"))
    stem.with_suffix(".md").write_text(markdown(result, stem.with_suffix(".png").name))
    return stem.with_suffix(".json")


def headline(result: dict) -> dict:
    cycles = result["cycles"]
    base, best = cycles[0]["measure"], max(cycles[1:] or cycles[:1], key=lambda c: c["measure"]["rated"])["measure"]
    last = cycles[-1]["measure"]
    gains = {"rated_gain": last["rated"] - base["rated"], "unrated_gain": last["unrated"] - base["unrated"],
             "plain_change": last["plain"] - base["plain"], "best_rated_gain": best["rated"] - base["rated"]}
    met = {"rated": gains["rated_gain"] >= TARGET["rated_gain"], "unrated": gains["unrated_gain"] > 0,
           "plain": gains["plain_change"] >= -TARGET["plain_loss"], "minutes": result["minutes"] <= TARGET["minutes"]}
    return {**gains, "target_met": met}


def markdown(result: dict, plot_name: str) -> str:
    h, cfg, env = result["headline"], result["config"], result["environment"]
    rows = ["| cycle | serving | tuning run | rated types | unrated types | plain |", "|---|---|---|---|---|---|"]
    for c in result["cycles"]:
        run = c.get("run")
        outcome = f"{run['outcome']}" if run else "-"
        m = c["measure"]
        rows.append(f"| {c['cycle']} | {'v' + str(c['serving']) if c['serving'] else 'base'} | {outcome} | "
                    f"{m['rated']:.1%} | {m['unrated']:.1%} | {m['plain']:.1%} |")
    yes = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines = [
        f"# instructd closed loop: {env['date'][:10]}", "",
        f"{cfg['cycles']} cycle(s) of {cfg['traffic']} rated exchanges on SmolLM2-135M-Instruct, "
        f"{env['cpus']} CPU cores, {result['minutes']:.1f} min in all.", "", *rows, "",
        f"- Rated types: {h['rated_gain']:+.1%} strict accuracy (target +25 points: {yes(h['target_met']['rated'])})",
        f"- Unrated types: {h['unrated_gain']:+.1%} (target: any gain: {yes(h['target_met']['unrated'])})",
        f"- Plain instructions: {h['plain_change']:+.1%} (target: at most 2 points lost: "
        f"{yes(h['target_met']['plain'])})",
        f"- Time: {result['minutes']:.1f} min (target under 45: {yes(h['target_met']['minutes'])})", "",
        "Strict prompt-level accuracy (every constraint followed) on held-out prompts never sent as traffic, "
        "greedy, through the gRPC API; plain = complete, on-topic, non-looping answers to plain instructions.", "",
        f"![accuracy per cycle]({plot_name})", "",
        "| tuning run | outcome | examples | loss | why |", "|---|---|---|---|---|",
        *[f"| {c['run']['run_id']} | {c['run']['outcome']} v{c['run']['candidate_version']} | "
          f"{c['run']['examples']} | {c['run']['final_loss']:.3f} | {c['run']['reason']} |"
          for c in result["cycles"] if c.get("run")], "",
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

    cycles = [c["cycle"] for c in result["cycles"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, label in (("rated", "rated instruction types"), ("unrated", "unrated types (zero-shot)"),
                       ("plain", "plain instructions (quality)")):
        ax.plot(cycles, [100 * c["measure"][key] for c in result["cycles"]], marker="o", label=label)
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
