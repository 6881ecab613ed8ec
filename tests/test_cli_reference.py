"""The CLI reference in docs/ is generated from --help; it must be current and every command must show an example."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REFERENCE = Path(__file__).parents[1] / "docs" / "cli_reference.py"


def _generator():
    spec = importlib.util.spec_from_file_location("cli_reference", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_cli_reference_is_current():
    generator = _generator()
    assert generator.TARGET.read_text() == generator.render(), "docs/cli.md is stale: run `make docs`"


def test_every_command_is_documented_with_an_example():
    generator = _generator()
    page = generator.TARGET.read_text()
    paths = generator.command_paths()
    assert {" ".join(p) for p in paths} >= {"score", "advantages", "plot", "plot dynamics", "audit", "report", "validate",
                                            "schema"}
    for path in paths:
        section = page.split(f"## empg {' '.join(path)}\n", 1)[1].split("\n## ", 1)[0]
        if path != ["plot"]:  # a group lists its commands
            assert "Example: empg " + " ".join(path) in section, path
