"""What the client commands share: how they reach a server (address, key, TLS), and one-line API errors."""

from __future__ import annotations

import functools
from pathlib import Path

import click
from instructd.server.config import ENV_API_KEY, ENV_TARGET, ENV_TLS_CA

from .channel import DEFAULT_TARGET, Tls
from .client import Client
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


def version_name(version: int) -> str:
    return f"v{version}" if version else "base"


class ApiErrorGroup(click.Group):
    """Turns API errors into a one-line message and exit code 1 instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ApiError as error:
            raise click.ClickException(str(error)) from None
