"""What every trainer reader shares: finding a layout's files, reading JSON lines with line numbers, the frame."""

from __future__ import annotations

import gc
import io
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import msgspec
import numpy as np
import polars as pl
import pyarrow as pa

from ..errors import BadInput
from ..validation import first_true

MESSAGE = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
"""The rollouts `messages` type: chat messages as role and content."""

FIDELITIES = ("ids", "messages", "text")
"""How exactly a converted file lets `empg score` rebuild the sampled tokens, most exact first."""


@dataclass(frozen=True)
class Options:
    """The knobs of `empg convert`; each reader uses those its format needs."""

    run: str = "default"
    """The `run` column of every row."""
    group_size: int | None = None
    """TRL: rows per group (the trainer's num_generations); its log has no group id."""
    reward_weights: tuple[float, ...] | None = None
    """TRL: weight of each reward-function column in the trajectory reward (default 1 each)."""
    mapping: dict[str, str] = field(default_factory=dict)
    """Generic tables: rollouts column -> source field."""


@dataclass(frozen=True)
class Converted:
    """A trainer's rows as a rollouts frame, and how exact its token sequences are."""

    frame: pl.DataFrame
    fidelity: str
    """`ids` (exact), `messages` (re-rendered with the chat template) or `text` (re-tokenised)."""


def layout_files(sources: Sequence[Path], pattern: str) -> list[Path]:
    """The files matching `pattern` (a glob) under each folder, or each file itself, in natural order."""
    files: list[Path] = []
    for source in sources:
        if not source.exists():
            raise BadInput(source, "no such file or folder")
        files.extend(sorted(source.rglob(pattern), key=natural_key) if source.is_dir() else [source])
    if not files:
        raise BadInput(sources[0], f"has no files named {pattern}")
    return files


def preferred_files(sources: Sequence[Path], pattern: str, *choices: Callable[[Path], bool]) -> list[Path]:
    """The layout's files: each named file, and under each folder the files of the first of `choices` that matches
    any (e.g. training before evaluation), else all of them."""
    files: list[Path] = []
    for source in sources:
        found = layout_files([source], pattern)
        files.extend(next((chosen for keep in choices if (chosen := [f for f in found if keep(f)])), found))
    return files


def natural_key(path: Path) -> list[Any]:
    """Sort key that puts step_9 before step_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def number_in(path: Path, pattern: str) -> int:
    """The integer that `pattern` (one group) finds in the path, e.g. the step of `step_12/`."""
    match = re.search(pattern, path.as_posix())
    if match is None:
        raise BadInput(path, f"does not name its training step as the layout does ({pattern})")
    return int(match.group(1))


def json_lines(path: Path, piece: Piece | None = None,
               decode: Callable[[bytes], Any] = msgspec.json.decode) -> Iterator[tuple[int, Any]]:
    """(1-based line number, object) for each non-blank line of the file or of one piece of it. `decode` may be a
    typed msgspec Decoder: it skips the fields its type does not name, and a value of the wrong type is a BadInput
    naming where in the line. A line that is not JSON, or not a JSON object, is a BadInput."""
    with open(path, "rb") as fh:
        lines: Iterator[bytes] = fh
        if piece is not None:
            fh.seek(piece.start)
            lines = islice(fh, piece.lines)
        for number, line in enumerate(lines, piece.line if piece is not None else 1):
            if not line.strip():
                continue
            try:
                value = decode(line)
            except msgspec.ValidationError as exc:
                raise BadInput(path, f"line {number} does not fit the layout: {exc}") from None
            except msgspec.DecodeError as exc:
                raise BadInput(path, f"line {number} is not valid JSON ({exc}); was the file cut short?") from None
            if not isinstance(value, (dict, msgspec.Struct)):
                raise BadInput(path, f"line {number} is not a JSON object")
            yield number, value


@dataclass(frozen=True)
class Piece:
    """A run of whole lines of a file: `lines` lines from byte `start`, the first of them line `line` (1-based)."""

    path: Path
    start: int
    lines: int
    line: int


PIECE_BYTES = 4 << 20
"""About how much JSON a piece holds: what one process parses at a time (its Python objects take ~10x that)."""
PARALLEL_BYTES = 32 << 20
"""From this much JSON on, a second process reads pieces too: below it, its start (~0.5 s of imports) costs more
than it saves."""


def pieces(files: Sequence[Path], size: int) -> list[Piece]:
    """The files cut into pieces of whole lines of about `size` bytes, in order (one read of each file)."""
    found = []
    for path in files:
        with open(path, "rb") as fh:
            start, line = 0, 1
            while block := fh.read(size):
                block += fh.readline()  # to the end of the line
                lines = block.count(b"\n") + (not block.endswith(b"\n"))
                found.append(Piece(path, start, lines, line))
                start, line = start + len(block), line + lines
    return found


Result = TypeVar("Result")
HELPER = ("import pickle, sys\n"
          "sys.path[:] = pickle.load(sys.stdin.buffer)\n"
          "from empg_cli.ingest.common import serve_pieces\n"
          "serve_pieces()\n")
"""The helper process: a fresh interpreter (forking one that runs polars' thread pool can deadlock; multiprocessing's
spawn would rerun the caller's unguarded script) with this process's import path."""


def read_pieces(read: Callable[[Piece], Result], files: Sequence[Path]) -> list[Result]:
    """read(piece) for every piece of the files, in order; `read` is a module-level function.

    From PARALLEL_BYTES of input on, with a second core free, a helper process reads pieces from the last one
    backwards while this one reads from the first, until they meet. This process's pieces all come before the
    helper's, so the first problem raised is the first in file order. A helper that cannot start or dies leaves
    its pieces to this process."""
    todo = pieces(files, PIECE_BYTES)
    if sum(os.path.getsize(f) for f in files) < PARALLEL_BYTES or _cores() < 2 or len(todo) < 2:
        return [read(piece) for piece in todo]
    replies: list[tuple[bool, Any] | None] = [None] * len(todo)
    claims = _Claims(len(todo))
    helper = _Helper(read, todo, claims, replies)
    try:
        while (k := claims.take(from_back=False)) is not None:
            replies[k] = (True, read(todo[k]))
        helper.join()
    finally:
        helper.stop()
    results = []
    for piece, reply in zip(todo, replies):
        ok, value = reply if reply is not None else (True, read(piece))
        if not ok:
            raise value
        results.append(value)
    return results


def _cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Claims:
    """Piece indices handed out from both ends, each once."""

    def __init__(self, count: int) -> None:
        self.front, self.back, self.lock = 0, count, threading.Lock()

    def close(self) -> None:
        """Hand out nothing more."""
        with self.lock:
            self.back = self.front

    def take(self, from_back: bool) -> int | None:
        with self.lock:
            if self.front == self.back:
                return None
            if from_back:
                self.back -= 1
                return self.back
            self.front += 1
            return self.front - 1


class _Helper:
    """A thread that hands the helper process pieces from the back, one at a time, and keeps its replies. A result
    comes back in a file, read in one call: through a pipe, each 64 KB would wait for this process's busy main
    thread to yield the GIL (up to 5 ms each time)."""

    def __init__(self, read: Callable[[Piece], Any], todo: list[Piece], claims: _Claims,
                 replies: list[tuple[bool, Any] | None]) -> None:
        self.process: subprocess.Popen | None = None
        self.claims = claims
        self.folder = tempfile.TemporaryDirectory(prefix="empg-pieces-")
        self.thread = threading.Thread(target=self._run, args=(read, todo, replies), daemon=True)
        self.thread.start()

    def _run(self, read, todo, replies) -> None:
        try:
            self.process = subprocess.Popen([sys.executable, "-c", HELPER], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            pickle.dump(sys.path, self.process.stdin)
            while (k := self.claims.take(from_back=True)) is not None:
                result = Path(self.folder.name) / f"{k}.pickle"
                pickle.dump((read, todo[k], result), self.process.stdin)
                self.process.stdin.flush()
                ok, problem = pickle.load(self.process.stdout)
                replies[k] = (True, pickle.loads(result.read_bytes())) if ok else (False, problem)
        except Exception:  # it could not start, died, or sent what cannot be read: its pieces are left
            pass

    def join(self) -> None:
        self.thread.join()

    def stop(self) -> None:
        """End the helper process (mid-piece if this one is raising) and its thread."""
        self.claims.close()
        if self.process is not None:
            self.process.kill()
        self.thread.join()
        if self.process is not None:  # it may have started after the kill above
            self.process.kill()
            self.process.stdin.close()
            self.process.stdout.close()
            self.process.wait()
        self.folder.cleanup()


def serve_pieces() -> None:
    """The helper's loop: (read, piece, path) in on stdin; the result pickled to the path, then (True, None), or
    (False, the problem raised), out on stdout; until stdin closes. Ctrl-C is the main process's to handle (it ends
    the helper)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            read, piece, path = pickle.load(requests)
        except EOFError:
            return
        try:
            path.write_bytes(pickle.dumps(read(piece), protocol=pickle.HIGHEST_PROTOCOL))
            reply = (True, None)
        except Exception as problem:
            reply = (False, problem)
        pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()


@contextmanager
def parsed_objects_kept() -> Iterator[None]:
    """Hold many parsed JSON objects at once without the cyclic garbage collector rescanning them: parsing makes no
    cycles, yet every few hundred new containers trigger a collection that walks all of them (for prime-rl's
    nodes, more than the parsing itself)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_json(path: Path) -> dict[str, Any]:
    """A whole-file JSON object; invalid JSON is a BadInput naming the line."""
    data = path.read_bytes()
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        at = re.search(r"\(byte (\d+)\)", str(exc))
        line = data.count(b"\n", 0, int(at.group(1)) if at else len(data)) + 1
        raise BadInput(path, f"line {line} is not valid JSON ({exc}); was the file cut short?") from None
    if not isinstance(value, dict):
        raise BadInput(path, "is not a JSON object")
    return value


FILE = "_file"
"""The column `flat_jsonl` adds: the path each record came from."""


def flat_jsonl(paths: Sequence[Path], required: Sequence[str]) -> pl.DataFrame:
    """JSON-lines files of flat records as one frame, parsed in one parallel pass, with a `_file` column; each
    field of `required` must be on every line."""
    lines, files, numbers = [], [], []
    for path in paths:
        with open(path, "rb") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    lines.append(line.rstrip(b"\r\n"))
                    files.append(str(path))
                    numbers.append(number)
    if not lines:
        raise BadInput(paths[0], "has no records")
    try:
        frame = pl.read_ndjson(io.BytesIO(b"\n".join(lines)), infer_schema_length=None)
    except Exception as exc:  # polars says which byte, not which line: find the line the slow way
        for path in paths:
            for _ in json_lines(path):
                pass
        raise BadInput(paths[0], f"cannot be read as JSON lines ({str(exc).splitlines()[0]})") from None
    for name in required:
        missing = (frame[name].is_null() if name in frame.columns else pl.repeat(True, frame.height, eager=True))
        row = first_true(missing)
        if row is not None:
            raise BadInput(files[row], f"line {numbers[row]} has no field '{name}'")
    return frame.with_columns(pl.Series(FILE, files))


def present(value: Any, name: str, path: Path, line: int) -> Any:
    """The value of field `name` (its path in the record, e.g. `run.work.step`), or a BadInput naming the file, line
    and missing field when it is absent or null."""
    if value is None:
        raise BadInput(path, f"line {line} has no field '{name}'")
    return value


def need(record: dict[str, Any], key: str, path: Path, line: int, where: str = "") -> Any:
    """record[key] of a parsed JSON object, as `present` checks it."""
    return present(record.get(key) if isinstance(record, dict) else None, f"{where}{key}", path, line)


def carried(frame: pl.DataFrame, produced: Sequence[str]) -> pl.DataFrame:
    """Source fields kept beside the rollouts columns; one whose name a rollouts column already takes is
    renamed `source_<name>`."""
    return frame.rename({c: f"source_{c}" for c in frame.columns if c in produced})


ROLLOUT_TYPES = {"run": pl.String, "iteration": pl.Int64, "group_id": pl.String, "traj_id": pl.String,
                 "step": pl.Int64, "prompt": pl.String, "messages": None, "prompt_ids": pl.List(pl.Int32),
                 "response": pl.String, "response_ids": pl.List(pl.Int32), "reward": pl.Float64}
"""The rollouts columns a converter produces, in the order they are written, with their types (None: as built)."""


def rollouts_frame(columns: dict[str, Any], extra: pl.DataFrame | None, run: str) -> pl.DataFrame:
    """The rollouts columns (typed, in schema order, `run` filled unless given), then the carried source fields."""
    frame = pl.DataFrame(columns)
    if "run" not in frame.columns:
        frame = frame.with_columns(run=pl.lit(run, pl.String))
    frame = frame.select([pl.col(c) if t is None else pl.col(c).cast(t) for c, t in ROLLOUT_TYPES.items()
                          if c in frame.columns])
    if extra is not None and extra.width:
        frame = pl.concat([frame, carried(extra, frame.columns)], how="horizontal")
    return frame


def each_file(sources: Sequence[Path], pattern: str, read_file: Callable[[Path, Options], pl.DataFrame],
              options: Options) -> pl.DataFrame:
    """One frame from every file of the layout, read by `read_file`, in natural file order."""
    return pl.concat([read_file(p, options) for p in layout_files(sources, pattern)], how="diagonal_relaxed")



def arrow(values: np.ndarray) -> pa.Array:
    """A numpy array as Arrow, by way of polars: `pa.array` would import pandas (~0.3 s) to inspect its argument."""
    return pl.Series(values).to_arrow()


def gather_spans(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """values[starts[i] : starts[i] + lengths[i]] for every i, end to end, in one gather: position j of span i
    reads starts[i] + (j - where span i begins in the output)."""
    ends = np.cumsum(lengths)
    return values[np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - lengths - starts, lengths)]


def list_series(lengths: np.ndarray, values: pa.Array, nulls: np.ndarray | None = None) -> pl.Series:
    """A list column from its flat values and each list's length (null where `nulls`): built at once, many times
    faster than from Python lists."""
    offsets = arrow(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
    mask = arrow(nulls) if nulls is not None and nulls.any() else None
    return pl.Series(pa.LargeListArray.from_arrays(offsets, values, mask=mask))


class MessageLists:
    """Many chat-message lists gathered flat (roles, contents, offsets), built into one `messages` column at once."""

    def __init__(self) -> None:
        self.roles: list[str] = []
        self.contents: list[str] = []
        self.lengths: list[int] = []

    def add(self, conversations: list[list[dict[str, Any]]]) -> None:
        """Take the role and content of every message (strings: holding them costs the garbage collector nothing)."""
        self.roles += [m.get("role") for messages in conversations for m in messages]
        self.contents += [m.get("content") or "" for messages in conversations for m in messages]
        self.lengths += map(len, conversations)

    def series(self) -> pl.Series:
        """Polars builds the string columns several times faster than `pa.array` does from Python strings."""
        structs = pl.DataFrame({"role": self.roles, "content": self.contents},
                               schema={"role": pl.String, "content": pl.String}).to_struct().to_arrow()
        return list_series(np.array(self.lengths, np.int64), structs).alias("messages")
