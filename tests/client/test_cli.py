"""The command line: every command's help carries an example, and the README names every command."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from instructd.client.cli import main

README = Path(__file__).parents[2] / "README.md"


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_help_with_an_example(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output and f"instructd {command}" in result.output


def test_readme_documents_every_command():
    text = README.read_text()
    missing = [c for c in main.commands if f"instructd {c}" not in text]
    assert not missing, f"README.md does not mention: {missing}"


def test_an_unreachable_server_gives_a_one_line_error():
    result = CliRunner().invoke(main, ["stats", "--target", "127.0.0.1:1"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: UNAVAILABLE")
