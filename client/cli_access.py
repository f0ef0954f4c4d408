"""The admin's commands: API keys, the audit log, forgetting a user, and exporting the feedback."""

from __future__ import annotations

import json

import click

from .cli_options import ApiErrorGroup, connection
from .export import FORMATS


@click.group(cls=ApiErrorGroup)
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


@click.command()
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


@click.command()
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


@click.command()
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
