"""Module-level `read` functions for `read_pieces` tests: the helper process imports them by name.

Each makes both processes take part however slowly the helper starts: the test process holds its first piece
until the helper has begun one (the helper creates the MARK file)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from empg_cli.errors import BadInput
from empg_cli.ingest.common import Piece, json_lines

PARENT = "EMPG_TEST_PARENT_PID"
"""The test process's pid, set by the test, so that a reader knows whether it runs in the helper."""
MARK = "EMPG_TEST_HELPER_MARK"
"""A file the helper creates when it begins a piece."""


def _in_helper() -> bool:
    """True in the helper (after marking); in the test process, waits for the mark first."""
    mark = Path(os.environ[MARK])
    if str(os.getpid()) != os.environ[PARENT]:
        mark.touch()
        return True
    deadline = time.monotonic() + 120
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return False


def lines_and_pid(piece: Piece) -> tuple[list[int], int]:
    """The line numbers of the piece's records and the pid of the process that read it."""
    _in_helper()
    return [number for number, _ in json_lines(piece.path, piece)], os.getpid()


def dies_in_the_helper(piece: Piece) -> tuple[list[int], int]:
    """lines_and_pid, but the helper dies at its first piece."""
    if _in_helper():
        os._exit(3)
    return lines_and_pid(piece)


def raises_at_bad(piece: Piece) -> list[int]:
    """A BadInput at the first record holding "bad", naming its line, from whichever process reads it."""
    _in_helper()
    for number, record in json_lines(piece.path, piece):
        if "bad" in record:
            raise BadInput(piece.path, f"line {number} is bad")
    return [piece.line]
