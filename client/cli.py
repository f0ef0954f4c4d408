"""The `instructd` command line: a thin layer over the client (and, for `serve` and `tuner`, over the processes
they run). The users' and operators' commands are here; the admin's in cli_access.py; serve and tuner in cli_run.py."""

from __future__ import annotations

import sys
import time
import urllib.request
from pathlib import Path

import click
from instructd.server.config import DEFAULT_METRICS_PORT

from .cli_access import audit, export, forget, keys
from .cli_options import ApiErrorGroup, connection, version_name
from .cli_run import serve, tuner
from .client import Client
from .top import Scrape, render


@click.group(cls=ApiErrorGroup)
def main() -> None:
    """instructd: a self-hosted LLM service that learns from its users.

    Every command but serve talks to a server: --target, and an API key (--api-key, $INSTRUCTD_API_KEY, or
    for a server on this machine the admin key it wrote into its data directory).

    \b
    Example:
      instructd serve                 # in one terminal
      instructd ask "Give three tips for staying healthy."
    """


for command in (serve, tuner, keys, audit, forget, export):
    main.add_command(command)


@main.command()
@click.argument("prompt")
@click.option("--system", help="System message to put first.")
@click.option("--adapter", help="Adapter version to use, or 'base' (default: the promoted one).")
@click.option("--max-tokens", type=int, help="Most tokens to generate.")
@click.option("--temperature", type=float, help="0 (greedy) to 2.")
@click.option("--seed", type=int, help="Seed for reproducible sampling.")
@click.option("--user", default="", help="User id stored with the exchange.")
@connection
def ask(prompt, system, adapter, max_tokens, temperature, seed, user, connect) -> None:
    """Ask a question; the answer streams to the terminal, then its response id and adapter version.

    \b
    Example:
      instructd ask "Give three tips for staying healthy." --max-tokens 128
    """
    with connect() as client:
        for event in client.stream(prompt, system=system, adapter=adapter, max_tokens=max_tokens,
                                   temperature=temperature, seed=seed, user_id=user):
            if isinstance(event, str):
                click.echo(event, nl=False)
                sys.stdout.flush()
            else:
                click.echo(f"\n\nresponse_id: {event.response_id}  adapter: {version_name(event.adapter_version)}"
                           f"  tokens: {event.prompt_tokens}+{event.completion_tokens}  finish: {event.finish_reason}")


@main.command()
@click.argument("response_id")
@click.argument("rating", type=click.Choice(["up", "down"]))
@click.option("--comment", default="", help="Free-text comment.")
@click.option("--correction", default="", help="A better answer, used for training.")
@click.option("--user", default="", help="Who rates; a later rating by the same user replaces this one.")
@connection
def feedback(response_id, rating, comment, correction, user, connect) -> None:
    """Rate an answer up or down (stored once committed).

    \b
    Example:
      instructd feedback 3f2a9c... up --comment "clear and short"
    """
    with connect() as client:
        feedback_id = client.feedback(response_id, rating, comment=comment, correction=correction, user_id=user)
    click.echo(f"feedback {feedback_id} stored")


@main.command()
@connection
def adapters(connect) -> None:
    """List adapter versions; the serving one is marked with *.

    \b
    Example:
      instructd adapters
    """
    with connect() as client:
        rows, promoted = client.adapters()
        canary = client.canary()
    click.echo(f"serving: {version_name(promoted)}")
    if canary:
        click.echo(canary.describe())
    for a in rows:
        mark = "*" if a.version == promoted else " "
        click.echo(f"{mark} v{a.version:<4} {a.status:<12} parent={version_name(a.parent_version):<6} "
                   f"created={a.created_at}  {a.path}")


@main.command()
@click.argument("path")
@click.option("--parent", default=0, help="Version it was trained from (0: the base model).")
@connection
def register(path, parent, connect) -> None:
    """Register a PEFT LoRA folder (inside the server's adapter dir) as a new version.

    \b
    Example:
      instructd register ~/.local/share/instructd/incoming/my-lora
    """
    with connect() as client:
        adapter = client.register(str(Path(path).expanduser().resolve()), parent_version=parent)
    click.echo(f"registered v{adapter.version} ({adapter.status})")


@main.command()
@click.argument("version", type=int, required=False)
@click.option("--if-current", type=int, help="Promote only if this version is serving now (compare-and-swap).")
@click.option("--canary", is_flag=True, help="Serve it to the canary share of users first; their ratings decide.")
@connection
def promote(version, if_current, canary, connect) -> None:
    """Serve VERSION for new requests (0: the base model). Without VERSION, approve the canary in progress.

    \b
    Example:
      instructd promote 3 --if-current 2
      instructd promote                 # the canary's version, for everyone (how manual mode promotes)
      instructd promote 4 --canary      # to a share of users first
    """
    with connect() as client:
        if version is None:
            running = client.canary()
            if running is None:
                raise click.UsageError("no canary is in progress: name the VERSION to promote")
            version, if_current = running.version, running.incumbent_version
        p = client.promote(version, if_current, canary)
    if p.canary:
        click.echo(p.canary.describe())
    else:
        click.echo(f"serving {version_name(p.promoted_version)} (was {version_name(p.previous_version)})")


@main.command()
@click.argument("version", type=int, required=False)
@click.option("--if-current", type=int, help="Roll back only if this version is serving now (compare-and-swap).")
@connection
def rollback(version, if_current, connect) -> None:
    """Return to the previous version, or to VERSION (0: the base model).

    \b
    Example:
      instructd rollback        # to the version served before this one
    """
    with connect() as client:
        p = client.rollback(version, if_current)
    click.echo(f"serving {version_name(p.promoted_version)} (was {version_name(p.previous_version)})")


@main.command()
@connection
def stats(connect) -> None:
    """Exchanges, ratings and thumbs-up rate per application and adapter version (an application key: its own).

    \b
    Example:
      instructd stats
    """
    with connect() as client:
        s = client.stats()
    click.echo(f"serving: {version_name(s.promoted_version)}")
    click.echo(f"{'application':<20} {'adapter':<8} {'exchanges':>9} {'up':>5} {'down':>5} {'up rate':>8}")
    for a in s.adapters:
        rate = f"{a.up_rate:.0%}" if a.up_rate is not None else "-"
        click.echo(f"{a.app_id:<20} {version_name(a.adapter_version):<8} {a.exchanges:>9} {a.ratings_up:>5} "
                   f"{a.ratings_down:>5} {rate:>8}")


@main.command()
@click.option("--now", is_flag=True, help="Ask the tuner to start a run as soon as it can.")
@click.option("--status", is_flag=True, help="Show the current run and the latest results (the default).")
@click.option("--watch", is_flag=True, help="Follow the newest run until it ends, with a progress bar.")
@connection
def tune(now, status, watch, connect) -> None:
    """Start a tuning run, or show how tuning goes.

    \b
    Example:
      instructd tune --now --watch
      instructd tune --status
    """
    with connect() as client:
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
    click.echo(f"serving: {version_name(state.promoted_version)}" + ("  (a run is requested)" if state.requested
                                                                       else ""))
    if state.canary:
        click.echo(state.canary.describe())
    for run in state.runs:
        line = f"run {run.id:<4} {run.status:<9} trigger={run.trigger:<9} started={run.started_at}"
        if run.status == "running":
            line += f"  step {run.step}/{run.total_steps}  loss {run.loss:.4f}"
        elif run.candidate_version:
            line += f"  candidate v{run.candidate_version}: {run.reason}"
        elif run.reason:
            line += f"  {run.reason}"
        click.echo(line)


@main.command()
@click.option("--metrics-url", default=f"http://localhost:{DEFAULT_METRICS_PORT}/metrics", show_default=True,
              help="The server's /metrics page.")
@click.option("--interval", default=5.0, show_default=True, help="Seconds between frames; rates are over this time.")
@click.option("--once", is_flag=True, help="Print one frame (after one interval) and exit.")
@connection
def top(metrics_url, interval, once, connect) -> None:
    """Live view: requests/s, time to first token, tokens/s, 👍 rate per version, serving version, tuning run.

    \b
    Example:
      instructd top --interval 2
    """
    def scrape() -> Scrape:
        try:
            with urllib.request.urlopen(metrics_url, timeout=10) as page:
                return Scrape.parse(page.read().decode(), time.monotonic())
        except OSError as error:
            raise click.ClickException(f"cannot read {metrics_url}: {error}") from None

    with connect() as client:
        before = scrape()
        while True:
            time.sleep(interval)  # the rates are measured over this interval
            after = scrape()
            runs = client.tuning_status(limit=1).runs
            frame = render(before, after, runs[0] if runs else None)
            if once:
                click.echo(frame)
                return
            click.clear()
            click.echo(frame)
            before = after




if __name__ == "__main__":
    main()
