"""The `instructd` command line: a thin layer over the client (and, for `serve`, the server)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from instructd.server.config import ENV_TARGET
from instructd.tuner.config import TunerConfig

from .client import Client
from .types import ApiError

TARGET = click.option("--target", envvar=ENV_TARGET, default="localhost:50051", show_default=True,
                      help="host:port of the instructd server (env INSTRUCTD_TARGET).")


def _version_name(version: int) -> str:
    return f"v{version}" if version else "base"


class _Group(click.Group):
    """Turns API errors into a one-line message and exit code 1 instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ApiError as error:
            raise click.ClickException(str(error)) from None


@click.group(cls=_Group)
def main() -> None:
    """instructd: a self-hosted LLM service that learns from its users.

    \b
    Example:
      instructd serve                 # in one terminal
      instructd ask "Give three tips for staying healthy."
    """


@main.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Hugging Face model folder to serve (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=50051, show_default=True, help="gRPC port.")
@click.option("--metrics-port", default=9090, show_default=True, help="Prometheus /metrics port.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="SQLite database and adapter versions (default: $INSTRUCTD_HOME or ~/.local/share/instructd).")
@click.option("--adapter-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Adapters may be registered only from inside this folder (default: DATA_DIR/incoming).")
@click.option("--max-model-len", default=2048, show_default=True, help="Context length in tokens.")
@click.option("--kv-cache-gib", default=2.0, show_default=True, help="CPU only: GiB for vLLM's KV cache.")
@click.option("--gpu-memory-utilization", default=0.8, show_default=True,
              help="GPU only: share of GPU memory for vLLM.")
@click.option("--tuner/--no-tuner", default=True, show_default=True,
              help="Also run the background tuner (in its own process) with default settings.")
def serve(model, host, port, metrics_port, data_dir, adapter_dir, max_model_len, kv_cache_gib,
          gpu_memory_utilization, tuner) -> None:
    """Run the service (gRPC, health, reflection, /metrics) until Ctrl-C or SIGTERM.

    \b
    Example:
      instructd serve --port 50051 --metrics-port 9090
    """
    import asyncio
    import logging

    from instructd.server.app import serve as run
    from instructd.server.config import ServerConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data_dir = data_dir.resolve() if data_dir else None
    config = ServerConfig(model=model, host=host, port=port, metrics_port=metrics_port, data_dir=data_dir,
                          adapter_dir=adapter_dir or (data_dir / "incoming" if data_dir else None),
                          max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                          gpu_memory_utilization=gpu_memory_utilization, tuner=tuner)
    asyncio.run(run(config))


@main.command()
@click.argument("prompt")
@click.option("--system", help="System message to put first.")
@click.option("--adapter", help="Adapter version to use, or 'base' (default: the promoted one).")
@click.option("--max-tokens", type=int, help="Most tokens to generate.")
@click.option("--temperature", type=float, help="0 (greedy) to 2.")
@click.option("--seed", type=int, help="Seed for reproducible sampling.")
@click.option("--user", default="", help="User id stored with the exchange.")
@TARGET
def ask(prompt, system, adapter, max_tokens, temperature, seed, user, target) -> None:
    """Ask a question; the answer streams to the terminal, then its response id and adapter version.

    \b
    Example:
      instructd ask "Give three tips for staying healthy." --max-tokens 128
    """
    with Client(target) as client:
        for event in client.stream(prompt, system=system, adapter=adapter, max_tokens=max_tokens,
                                   temperature=temperature, seed=seed, user_id=user):
            if isinstance(event, str):
                click.echo(event, nl=False)
                sys.stdout.flush()
            else:
                click.echo(f"\n\nresponse_id: {event.response_id}  adapter: {_version_name(event.adapter_version)}"
                           f"  tokens: {event.prompt_tokens}+{event.completion_tokens}  finish: {event.finish_reason}")


@main.command()
@click.argument("response_id")
@click.argument("rating", type=click.Choice(["up", "down"]))
@click.option("--comment", default="", help="Free-text comment.")
@click.option("--correction", default="", help="A better answer, used for training.")
@click.option("--user", default="", help="Who rates; a later rating by the same user replaces this one.")
@TARGET
def feedback(response_id, rating, comment, correction, user, target) -> None:
    """Rate an answer up or down (stored once committed).

    \b
    Example:
      instructd feedback 3f2a9c... up --comment "clear and short"
    """
    with Client(target) as client:
        feedback_id = client.feedback(response_id, rating, comment=comment, correction=correction, user_id=user)
    click.echo(f"feedback {feedback_id} stored")


@main.command()
@TARGET
def adapters(target) -> None:
    """List adapter versions; the serving one is marked with *.

    \b
    Example:
      instructd adapters
    """
    with Client(target) as client:
        rows, promoted = client.adapters()
    click.echo(f"serving: {_version_name(promoted)}")
    for a in rows:
        mark = "*" if a.version == promoted else " "
        click.echo(f"{mark} v{a.version:<4} {a.status:<12} parent={_version_name(a.parent_version):<6} "
                   f"created={a.created_at}  {a.path}")


@main.command()
@click.argument("path")
@click.option("--parent", default=0, help="Version it was trained from (0: the base model).")
@TARGET
def register(path, parent, target) -> None:
    """Register a PEFT LoRA folder (inside the server's adapter dir) as a new version.

    \b
    Example:
      instructd register ~/.local/share/instructd/incoming/my-lora
    """
    with Client(target) as client:
        adapter = client.register(str(Path(path).expanduser().resolve()), parent_version=parent)
    click.echo(f"registered v{adapter.version} ({adapter.status})")


@main.command()
@click.argument("version", type=int)
@click.option("--if-current", type=int, help="Promote only if this version is serving now (compare-and-swap).")
@TARGET
def promote(version, if_current, target) -> None:
    """Serve VERSION for new requests (0: the base model).

    \b
    Example:
      instructd promote 3 --if-current 2
    """
    with Client(target) as client:
        p = client.promote(version, if_current)
    click.echo(f"serving {_version_name(p.promoted_version)} (was {_version_name(p.previous_version)})")


@main.command()
@click.argument("version", type=int, required=False)
@TARGET
def rollback(version, target) -> None:
    """Return to the previous version, or to VERSION (0: the base model).

    \b
    Example:
      instructd rollback        # to the version served before this one
    """
    with Client(target) as client:
        p = client.rollback(version)
    click.echo(f"serving {_version_name(p.promoted_version)} (was {_version_name(p.previous_version)})")


@main.command()
@TARGET
def stats(target) -> None:
    """Exchanges, ratings and thumbs-up rate per adapter version.

    \b
    Example:
      instructd stats
    """
    with Client(target) as client:
        s = client.stats()
    click.echo(f"serving: {_version_name(s.promoted_version)}")
    click.echo(f"{'adapter':<8} {'exchanges':>9} {'up':>5} {'down':>5} {'up rate':>8}")
    for a in s.adapters:
        rate = f"{a.up_rate:.0%}" if a.up_rate is not None else "-"
        click.echo(f"{_version_name(a.adapter_version):<8} {a.exchanges:>9} {a.ratings_up:>5} "
                   f"{a.ratings_down:>5} {rate:>8}")


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The server's data directory (default: $INSTRUCTD_HOME or ~/.local/share/instructd).")
@click.option("--adapter-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The server's adapter directory, where candidates are written (default: DATA_DIR/incoming).")
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The base model folder the server serves (default: the embedded model).")
@click.option("--objective", type=click.Choice(["sft", "kto"]), default=TunerConfig.objective, show_default=True,
              help="sft: learn 👍 answers and corrections; kto: also push away from 👎 answers.")
@click.option("--steps", default=TunerConfig.steps, show_default=True, help="Most training steps per run.")
@click.option("--epochs", default=TunerConfig.epochs, show_default=True,
              help="Passes over the run's examples (within --steps).")
@click.option("--learning-rate", default=TunerConfig.learning_rate, show_default=True)
@click.option("--rank", default=TunerConfig.rank, show_default=True, help="LoRA rank of a fresh adapter.")
@click.option("--min-new-ratings", default=TunerConfig.min_new_ratings, show_default=True,
              help="Start a run after this many new ratings.")
@click.option("--period", default=TunerConfig.period_seconds, show_default=True,
              help="Also start a run every PERIOD seconds (0: never).")
@click.option("--include-older", is_flag=True, help="Also learn from ratings older than the last run.")
@click.option("--blocklist", multiple=True, help="Never train on exchanges containing this phrase (repeatable).")
@click.option("--classifier", default="", help="'module:function' returning True for an example to leave out.")
@click.option("--once", is_flag=True, help="Run one tuning cycle now, then exit.")
@TARGET
def tuner(data_dir, adapter_dir, model, objective, steps, epochs, learning_rate, rank, min_new_ratings, period,
          include_older, blocklist, classifier, once, target) -> None:
    """Run the tuner: it turns new ratings into LoRA candidates, gates them, promotes the winners.

    \b
    Example:
      instructd tuner --min-new-ratings 100 --objective kto
    """
    import logging

    from instructd.server.config import default_cache, default_home
    from instructd.server.model import default_model
    from instructd.tuner.scheduler import run_tuner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data_dir = (data_dir or default_home()).resolve()
    config = TunerConfig(data_dir=data_dir, adapter_dir=adapter_dir or data_dir / "incoming",
                         model=model or default_model(default_cache()), target=target, objective=objective,
                         steps=steps, epochs=epochs, learning_rate=learning_rate, rank=rank, lora_alpha=2 * rank,
                         min_new_ratings=min_new_ratings, period_seconds=period, include_older=include_older,
                         blocklist=tuple(blocklist))
    run_tuner(config, once=once, classifier=classifier)


@main.command()
@click.option("--now", is_flag=True, help="Ask the tuner to start a run as soon as it can.")
@click.option("--status", is_flag=True, help="Show the current run and the latest results (the default).")
@click.option("--watch", is_flag=True, help="Follow the newest run until it ends, with a progress bar.")
@TARGET
def tune(now, status, watch, target) -> None:
    """Start a tuning run, or show how tuning goes.

    \b
    Example:
      instructd tune --now --watch
      instructd tune --status
    """
    with Client(target) as client:
        if now:
            client.trigger_tuning()
            click.echo("tuning run requested")
        if watch:
            _watch(client, requested=now)
        _print_tuning(client.tuning_status())


def _watch(client: Client, requested: bool) -> None:
    """Follows the run just requested (one after the newest finished run), else the newest run."""
    runs = client.tuning_status(limit=1).runs
    newest = runs[0] if runs else None
    after = newest.id if newest and requested and newest.status != "running" else newest.id - 1 if newest else 0
    client.follow_run(after)


def _print_tuning(state) -> None:
    click.echo(f"serving: {_version_name(state.promoted_version)}" + ("  (a run is requested)" if state.requested
                                                                       else ""))
    for run in state.runs:
        line = f"run {run.id:<4} {run.status:<9} trigger={run.trigger:<9} started={run.started_at}"
        if run.status == "running":
            line += f"  step {run.step}/{run.total_steps}  loss {run.loss:.4f}"
        elif run.candidate_version:
            verdict = run.detail.get("verdict", {})
            line += f"  candidate v{run.candidate_version}: {verdict.get('reason', '')}"
        elif run.detail.get("reason") or run.detail.get("error"):
            line += f"  {run.detail.get('reason') or run.detail.get('error')}"
        click.echo(line)


if __name__ == "__main__":
    main()
