"""Generate docs/cli.md from the commands' own --help, so the reference cannot drift (`make docs`)."""

from __future__ import annotations

import sys
from pathlib import Path

from typer.main import get_command
from typer.testing import CliRunner

from empg_cli.cli import app

TARGET = Path(__file__).with_name("cli.md")
WIDTH = 100


def command_paths() -> list[list[str]]:
    """Every command of the app, groups included, in registration order."""
    paths: list[list[str]] = []

    def walk(command, prefix: list[str]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            paths.append(prefix + [name])
            walk(sub, prefix + [name])
    walk(get_command(app), [])
    return paths


def render() -> str:
    """The reference page: one section per command with its --help as plain text."""
    runner = CliRunner()
    parts = ["# empg command reference\n", "Generated from `--help` by `docs/cli_reference.py` (`make docs`); "
             "do not edit by hand.\n"]
    for path in [[]] + command_paths():
        result = runner.invoke(app, [*path, "--help"], prog_name="empg", terminal_width=WIDTH,
                               env={"COLUMNS": str(WIDTH), "NO_COLOR": "1", "TERM": "dumb"})
        text = "\n".join(line.rstrip() for line in result.output.strip("\n").splitlines())
        parts.append(f"## empg {' '.join(path)}".rstrip() + f"\n\n```text\n{text}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    TARGET.write_text(render())
    sys.stdout.write(f"wrote {TARGET}\n")
