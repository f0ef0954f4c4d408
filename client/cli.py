"""The `instructd` command line: a thin layer over the client (and, for `serve`, the server)."""

from __future__ import annotations

import functools
import json
import sys
import time
import urllib.request
from pathlib import Path

import click
from instructd.server.config import DEFAULT_METRICS_PORT, ENV_API_KEY, ENV_TARGET, ENV_TLS_CA

from .channel import DEFAULT_TARGET, Tls
from .cli_run import serve, tuner
from .client import Client
from .export import FORMATS
from .top import Scrape, render
from .types import ApiError

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_CONNECTION = [
    click.option("--target", envvar=ENV_TARGET, default=DEFAULT_TARGET, show_default=True,
                 help=f"host:port of the instructd server (env {ENV_TARGET})."),
    click.option("--api-key", envvar=ENV_API_KEY, help=f"API key (env {ENV_API_KEY}; default for a server on this "
                                                       "machine: the admin key in its data directory)."),
    click.option("--tls-ca", type=_FILE, envvar=ENV_TLS_CA, help=f"Speak TLS, trusting this CA (env {ENV_TLS_CA})."),
    click.option("--tls-cert", type=_FILE, help="Client certificate, for a server that requires one (mutual TLS)."),
    click.option("--tls-key", type=_FILE, help="The client certificate's private key."),
]


def connection(command):
    """Adds the options that say how to reach the server; the command gets `connect()`, which opens a Client."""
    @functools.wraps(command)
    def wrapper(*args, target, api_key, tls_ca, tls_cert, tls_key, **kwargs):
        tls = Tls(tls_ca, tls_cert, tls_key) if tls_ca or tls_cert else None
        return command(*args, connect=lambda kind=Client: kind(target, api_key=api_key, tls=tls), **kwargs)
    for option in reversed(_CONNECTION):
        wrapper = option(wrapper)
    return wrapper


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

    Every command but serve talks to a server: --target, and an API key (--api-key, $INSTRUCTD_API_KEY, or
    for a server on this machine the admin key it wrote into its data directory).

    \b
    Example:
      instructd serve                 # in one terminal
      instructd ask "Give three tips for staying healthy."
    """


main.add_command(serve)
main.add_command(tuner)


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
                click.echo(f"\n\nresponse_id: {event.response_id}  adapter: {_version_name(event.adapter_version)}"
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
    click.echo(f"serving: {_version_name(promoted)}")
    for a in rows:
        mark = "*" if a.version == promoted else " "
        click.echo(f"{mark} v{a.version:<4} {a.status:<12} parent={_version_name(a.parent_version):<6} "
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
@click.argument("version", type=int)
@click.option("--if-current", type=int, help="Promote only if this version is serving now (compare-and-swap).")
@connection
def promote(version, if_current, connect) -> None:
    """Serve VERSION for new requests (0: the base model).

    \b
    Example:
      instructd promote 3 --if-current 2
    """
    with connect() as client:
        p = client.promote(version, if_current)
    click.echo(f"serving {_version_name(p.promoted_version)} (was {_version_name(p.previous_version)})")


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
    click.echo(f"serving {_version_name(p.promoted_version)} (was {_version_name(p.previous_version)})")


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
    click.echo(f"serving: {_version_name(s.promoted_version)}")
    click.echo(f"{'application':<20} {'adapter':<8} {'exchanges':>9} {'up':>5} {'down':>5} {'up rate':>8}")
    for a in s.adapters:
        rate = f"{a.up_rate:.0%}" if a.up_rate is not None else "-"
        click.echo(f"{a.app_id:<20} {_version_name(a.adapter_version):<8} {a.exchanges:>9} {a.ratings_up:>5} "
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
    click.echo(f"serving: {_version_name(state.promoted_version)}" + ("  (a run is requested)" if state.requested
                                                                       else ""))
    for run in state.runs:
        line = f"run {run.id:<4} {run.status:<9} trigger={run.trigger:<9} started={run.started_at}"
        if run.status == "running":
            line += f"  step {run.step}/{run.total_steps}  loss {run.loss:.4f}"
        elif run.candidate_version:
            line += f"  candidate v{run.candidate_version}: {run.reason}"
        elif run.reason:
            line += f"  {run.reason}"
        click.echo(line)


@main.group(cls=_Group)
def keys() -> None:
    """Create, list and revoke API keys (an admin key is needed).

    A key belongs to one application and has one role: app (generate and rate, for its own application),
    tuner (what the tuner needs) or admin (everything). Its secret is shown once, when it is made.

    \b
    Example:
      instructd keys create --app billing-bot --role app --name "billing bot, production"
      instructd keys list
      instructd keys revoke 3f2a9c0d1e4b
      instructd keys import ik_3f2a9c0d1e4b_... --app billing-bot --target replica-b:50051
    """


@keys.command("create")
@click.option("--app", "app_id", required=True, help="The application the key belongs to.")
@click.option("--role", type=click.Choice(["app", "tuner", "admin"]), default="app", show_default=True)
@click.option("--name", default="", help="A name for people to recognise it by.")
@connection
def create_key(app_id, role, name, connect) -> None:
    """Make a key; its secret is printed once and kept nowhere.

    \b
    Example:
      instructd keys create --app billing-bot --role app
    """
    with connect() as client:
        key, secret = client.create_key(app_id, role, name)
    click.echo(f"key {key.id} ({key.role} of {key.app_id}) created; its secret, shown only now:\n{secret}")


@keys.command("import")
@click.argument("secret")
@click.option("--app", "app_id", required=True, help="The application the key belongs to (as where it was made).")
@click.option("--role", type=click.Choice(["app", "tuner", "admin"]), default="app", show_default=True)
@click.option("--name", default="", help="A name for people to recognise it by.")
@connection
def import_key(secret, app_id, role, name, connect) -> None:
    """Register a key made on another replica (its whole secret), so that it works here too.

    \b
    Example:
      instructd keys import ik_3f2a9c0d1e4b_... --app billing-bot --role app --target replica-b:50051
    """
    with connect() as client:
        key, _ = client.create_key(app_id, role, name, secret)
    click.echo(f"key {key.id} ({key.role} of {key.app_id}) registered")


@keys.command("list")
@connection
def list_keys(connect) -> None:
    """List every key, revoked ones too (never their secrets).

    \b
    Example:
      instructd keys list
    """
    with connect() as client:
        rows = client.keys()
    click.echo(f"{'id':<13} {'role':<6} {'application':<20} {'created':<30} {'last used':<30} name")
    for k in rows:
        state = f"REVOKED {k.revoked_at}" if k.revoked_at else k.last_used_at or "-"
        click.echo(f"{k.id:<13} {k.role:<6} {k.app_id:<20} {k.created_at:<30} {state:<30} {k.name}")


@keys.command("revoke")
@click.argument("key_id")
@connection
def revoke_key(key_id, connect) -> None:
    """Revoke the key with id KEY_ID: every later call with it is UNAUTHENTICATED.

    \b
    Example:
      instructd keys revoke 3f2a9c0d1e4b
    """
    with connect() as client:
        key = client.revoke_key(key_id)
    click.echo(f"key {key.id} ({key.role} of {key.app_id}) revoked at {key.revoked_at}")


@main.command()
@click.option("--limit", default=50, show_default=True, help="How many events, newest first.")
@connection
def audit(limit, connect) -> None:
    """Admin and tuner actions: keys, registrations, promotions, rollbacks, evaluations, tuning, forgetting.

    \b
    Example:
      instructd audit --limit 20
    """
    with connect() as client:
        events = client.audit(limit)
    for e in events:
        click.echo(f"{e.at}  {e.action:<20} {e.target:<30} by key {e.key_id or '-'} ({e.app_id})")


@main.command()
@click.option("--app", "app_id", required=True, help="The application the user belongs to.")
@click.option("--user", "user_id", required=True, help="The user id the application sent.")
@connection
def forget(app_id, user_id, connect) -> None:
    """Delete one user's exchanges and ratings in one application, for good (never trained on again).

    \b
    Example:
      instructd forget --app billing-bot --user customer-4711
    """
    with connect() as client:
        exchanges, ratings = client.forget(app_id, user_id)
    click.echo(f"deleted {exchanges} exchanges and {ratings} ratings")


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


@main.command()
@click.option("--app", "app_id", default="", help="One application's feedback (default: every application's).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="sft", show_default=True,
              help="sft, kto, dpo: TRL's conversational formats; openai: OpenAI chat fine-tuning.")
@click.option("--held-out", type=click.Choice(["all", "only", "exclude"]),
              help="Which held-out rows (default: all, marked held_out, for sft/kto/dpo; exclude for openai, whose "
                   "files cannot mark them: `--held-out only` makes its validation file).")
@click.option("--since", help="Only ratings given at or after this UTC time (ISO-8601, e.g. 2026-11-01).")
@click.option("--after", type=int, default=0, help="Only ratings after this export cursor (resume an export).")
@connection
def export(app_id, fmt, held_out, since, after, connect) -> None:
    """Write rated feedback as JSON lines to standard output, to train elsewhere (a tuner or admin key).

    \b
    Example:
      instructd export --app billing-bot --format dpo > pairs.jsonl
      instructd export --format openai > train.jsonl && instructd export --format openai --held-out only > val.jsonl
    """
    from instructd.v1 import instructd_pb2 as pb

    from .export import records
    from .tuning import TuningClient

    held_out = held_out or ("exclude" if fmt == "openai" else "all")
    which = {"all": pb.HELD_OUT_ALL, "only": pb.HELD_OUT_ONLY, "exclude": pb.HELD_OUT_EXCLUDED}[held_out]
    with connect(TuningClient) as client:
        rows = (r for r in client.export(after=after, app_id=app_id, held_out=which) if not since or r.rated_at >= since)
        for record in records(rows, fmt):
            click.echo(json.dumps(record, ensure_ascii=False))


if __name__ == "__main__":
    main()
