"""What every trainer reader shares: finding a layout's files, reading JSON lines with line numbers, the frame."""

from __future__ import annotations

import gc
import io
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import orjson
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


def json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line; a line that is not a JSON object is a BadInput."""
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise BadInput(path, f"line {number} is not valid JSON ({exc.msg}); was the file cut short?") from None
            if not isinstance(value, dict):
                raise BadInput(path, f"line {number} is not a JSON object")
            yield number, value


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
    try:
        value = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise BadInput(path, f"line {exc.lineno} is not valid JSON ({exc.msg}); was the file cut short?") from None
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


def need(record: dict[str, Any], key: str, path: Path, line: int, where: str = "") -> Any:
    """record[key], or a BadInput naming the file, line and missing field."""
    if not isinstance(record, dict) or record.get(key) is None:
        raise BadInput(path, f"line {line} has no field '{where}{key}'")
    return record[key]


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
