"""Read and validate rollouts; stream scored tables with their `empg` metadata (docs/method.md)."""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .config import AdvantageConfig, advantage_config_from
from .errors import BadInput, BadUsage
from .schema import TRAJ_KEYS, check_column_types, check_required_columns, load_schema
from .validation import (NON_NEGATIVE, ROW, Problems, check_keys, check_list_or_text, check_numbers,
                         check_token_entropy)

METADATA_KEY = b"empg"


ROWS_PER_CHUNK = 16384
"""Rows read, scored and written at a time: memory is bounded by a chunk, not by the file."""


@dataclass(frozen=True)
class InputFiles:
    """The Parquet file(s) a user named, read as one table: a file, a folder (every *.parquet under it, in sorted
    path order) or a glob. Messages name each row by its own file and row there (`locate`)."""

    name: str
    """As the user wrote it: the file, folder or glob."""
    files: tuple[Path, ...]
    starts: tuple[int, ...]
    """The table row of each file's first row."""
    folder: Path
    """Where relative paths in the metadata point from: the named folder, else the (first) file's folder."""

    def __str__(self) -> str:
        return self.name

    def locate(self, row: int) -> tuple[Path, int]:
        """(file, row in that file) of a row of the whole table."""
        i = bisect.bisect_right(self.starts, row) - 1
        return self.files[i], row - self.starts[i]

    def sha256(self) -> str:
        """sha256 of the file's bytes; of several files, over each one's name and sha256, in order."""
        if len(self.files) == 1:
            return sha256_file(self.files[0])
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(f.name.encode() + b"\0" + bytes.fromhex(sha256_file(f)))
        return digest.hexdigest()


@dataclass
class Rollouts:
    """A validated rollouts (or scored) table: its keys in memory, its content streamed chunk by chunk from disk."""

    source: InputFiles
    schema: pa.Schema
    """The table's Arrow schema (its first file's column order): its columns and order are written back unchanged."""
    steps: pl.DataFrame
    """One row per step in table order: _row, run, iteration, group_id, traj_id, step, reward, batch keys (+ advantage)."""
    input_column: str | None
    """prompt_ids, messages or prompt: the first present (ids win over text); None if absent and unused."""
    output_column: str | None
    """response_ids or response; None if absent and unused."""
    metadata: dict[str, Any] | None
    """The `empg` metadata of the (first) file, if it was written by empg."""

    def chunks(self, columns: list[str] | None = None, rows: int = ROWS_PER_CHUNK) -> Iterator[tuple[int, pa.Table]]:
        """(first row, table) for consecutive chunks of the table, with only `columns` (default: all) read."""
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        for path, first in zip(self.source.files, self.source.starts):
            with _reading(path):
                for batch in open_parquet(path).iter_batches(batch_size=rows, columns=schema.names):
                    yield first, pa.Table.from_batches([batch]).select(schema.names).cast(schema)
                    first += batch.num_rows


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A file that pyarrow cannot decode (a corrupt page, a failed page checksum) is a BadInput naming it."""
    try:
        yield
    except (pa.ArrowException, OSError) as exc:
        raise BadInput(path, f"cannot be read as Parquet ({str(exc).strip().splitlines()[0]})") from exc


def _check_regular_file(path: Path) -> None:
    """A regular, readable file; a FIFO, device or socket is refused before anything opens it (nothing hangs)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise BadInput(path, "is a broken symbolic link" if path.is_symlink() else "no such file") from None
    except OSError as exc:
        raise BadInput(path, f"cannot be read ({exc.strerror.lower()})") from None
    if stat.S_ISDIR(mode):
        raise BadInput(path, "is a directory, not a Parquet file")
    if not stat.S_ISREG(mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise BadUsage(f"{path} is {kind}; empg reads Parquet files, or folders or globs of them")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise BadInput(path, f"cannot be read ({exc.strerror.lower()})") from None
    if magic != b"PAR1":
        raise BadInput(path, "is not a Parquet file" + (" (it is empty)" if not magic else ""))


def open_parquet(path: Path) -> pq.ParquetFile:
    """The Parquet file, opened with page-checksum verification; anything but a readable Parquet file is a
    BadInput (or a BadUsage for a FIFO, device or socket)."""
    _check_regular_file(path)
    with _reading(path):
        parquet = pq.ParquetFile(path, page_checksum_verification=True)
    names = parquet.schema_arrow.names
    twice = [n for n in dict.fromkeys(names) if names.count(n) > 1]
    if twice:
        raise BadInput(path, f"appears {names.count(twice[0])} times; every column needs its own name",
                       column=twice[0])
    return parquet


GLOB_CHARS = set("*?[")


def parquet_files(name: str | Path) -> tuple[list[Path], Path]:
    """The files a name stands for, and the folder relative metadata paths start from: a file is itself; a
    folder is every *.parquet under it (sorted); a glob (when no such path exists) its sorted matches."""
    path = Path(name)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith("."))
        if not files:
            raise BadInput(path, "is a folder with no .parquet file under it")
        return files, path
    if not os.path.lexists(path) and GLOB_CHARS & set(str(name)):
        files = sorted(Path(p) for p in glob.glob(str(name), recursive=True) if not Path(p).is_dir())
        if not files:
            raise BadInput(name, "matches no file")
        return files, Path(os.path.commonpath([f.parent for f in files]))
    return [path], path.parent


def open_source(name: str | Path) -> tuple[InputFiles, pa.Schema]:
    """The input files a user named and the one schema of its files (types unified, e.g. int32 with int64).

    Every file is opened (and checked: a regular Parquet file, no duplicated column) before any is read.
    """
    files, folder = parquet_files(name)
    opened = [open_parquet(f) for f in files]
    for path, parquet in zip(files, opened):
        check_metadata(parquet.schema_arrow, path)
    schema = opened[0].schema_arrow
    for path, parquet in zip(files[1:], opened[1:]):
        names = parquet.schema_arrow.names
        if set(names) != set(schema.names):
            extra = sorted(set(names) - set(schema.names)) + sorted(set(schema.names) - set(names))
            raise BadInput(path, f"its columns differ from those of {files[0]} (column '{extra[0]}'); files read as "
                                 f"one table need the same columns")
        try:
            schema = pa.unify_schemas([schema, parquet.schema_arrow.remove_metadata()], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise BadInput(path, f"its column types differ from those of {files[0]} ({exc})") from None
    starts = np.cumsum([0] + [p.metadata.num_rows for p in opened[:-1]]).tolist()
    if sum(p.metadata.num_rows for p in opened) == 0:
        raise BadInput(name, "has no rows")
    return InputFiles(str(name), tuple(files), tuple(starts), folder), schema.with_metadata(opened[0].schema_arrow.metadata)


def read_columns(source: InputFiles, schema: pa.Schema, columns: list[str]) -> pa.Table:
    """Some columns of the whole table (every file), for data that fits in memory."""
    tables = []
    for path in source.files:
        with _reading(path):
            tables.append(open_parquet(path).read(columns=columns).cast(pa.schema([schema.field(c) for c in columns])))
    return pa.concat_tables(tables)


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """The Parquet file (or some of its columns) as one Arrow table, for data that fits in memory."""
    parquet = open_parquet(path)
    if parquet.metadata.num_rows == 0:
        raise BadInput(path, "has no rows")
    with _reading(path):
        return parquet.read(columns=columns)


def read_metadata(source: pa.Table | pa.Schema) -> dict[str, Any] | None:
    """The `empg` key-value metadata of a table or schema, parsed, or None (checked by `check_metadata` on open)."""
    schema = source.schema if isinstance(source, pa.Table) else source
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None


def check_metadata(schema: pa.Schema, path: Path) -> None:
    """The file's `empg` metadata is data, not authority: valid JSON, an object, and the keys empg reads
    (temperature, model.ref, advantages) of the right type and range; else a BadInput naming the key."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if not raw:
        return
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise BadInput(path, f"its 'empg' metadata is not valid JSON ({reason}); rewrite the file without it") from None
    if not isinstance(meta, dict):
        raise BadInput(path, f"its 'empg' metadata is a JSON {type(meta).__name__}, not an object")
    temperature = meta.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 < temperature < float("inf")):
        raise BadInput(path, f"its 'empg' metadata key 'temperature' is {json.dumps(temperature)}; it must be a number "
                             "> 0 (or pass --temperature)")
    model = meta.get("model")
    if model is not None and not (isinstance(model, dict) and isinstance(model.get("ref", ""), (str, type(None)))):
        raise BadInput(path, "its 'empg' metadata key 'model' must be an object whose 'ref' is a path or hub id "
                             "(or pass --model)")
    for key in ("advantages", "score"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise BadInput(path, f"its 'empg' metadata key '{key}' must be an object")
    stored = meta.get("advantages") or {}
    for field in fields(AdvantageConfig):
        value = stored.get(field.name)
        wanted = {"str": str, "float": (int, float), "tuple[str, ...]": list}[str(field.type)]
        if value is not None and (isinstance(value, bool) or not isinstance(value, wanted)
                                  or (wanted is list and not all(isinstance(v, str) for v in value))):
            raise BadInput(path, f"its 'empg' metadata key 'advantages.{field.name}' is {json.dumps(value)}, not a "
                                 f"{'list of column names' if wanted is list else 'string' if wanted is str else 'number'}")
    try:
        advantage_config_from(stored)
    except BadUsage as exc:
        flag = str(exc).split()[0]
        raise BadInput(path, f"its 'empg' metadata key 'advantages.{flag.lstrip('-').replace('-', '_')}' is out of "
                             f"range: {str(exc).removeprefix(flag + ' ')}") from None


def _check_required(schema: pa.Schema, source: InputFiles, scored: bool | Sequence[str],
                    text: bool) -> tuple[str | None, str | None]:
    """The columns a rollouts (or scored) table needs are present; returns the chosen (input, output) columns."""
    new_columns = [c["name"] for c in load_schema("scored")["columns"]]
    if scored:
        missing = [c for c in (new_columns if scored is True else scored) if c not in schema.names]
        if missing:
            raise BadInput(source, f"is not a scored file: column '{missing[0]}' is missing; make one with `empg score`")
    else:
        present = [c for c in new_columns if c in schema.names]
        if present:
            raise BadInput(source, "is already present: this looks like a scored file; recompute advantages with "
                                   "`empg advantages`, or drop the column", column=present[0])
    return check_required_columns(schema, source, text)


def open_rollouts(name: str | Path, advantages: AdvantageConfig, *, entropy_source: str = "model",
                  scored: bool | Sequence[str] = False, content: bool = True, every_column: bool = False) -> Rollouts:
    """Read and validate a rollouts table (or, with `scored`, a scored one: True needs every scored column, a list
    of names only those): a file, a folder or a glob, per the data model of docs/method.md. The scored columns
    present are checked (finite; set unless nullable; entropies and counts >= 0).

    The key columns are read whole; prompt, response and entropy columns (with `content`; with `every_column`,
    all columns, so every page is decoded and checksummed) chunk by chunk. Raises one BadInput listing every
    problem found (file, column, row), the first 20 shown.
    """
    source, schema = open_source(name)
    check_column_types(schema, source, "scored" if scored else "rollouts")
    input_column, output_column = _check_required(schema, source, scored, content or every_column)
    if entropy_source == "logged" and "token_entropy" not in schema.names:
        raise BadInput(source, "--entropy-source logged needs the column 'token_entropy' "
                               "(per-token entropies logged at generation time)")
    problems = Problems(source)
    keys = [c for c in dict.fromkeys((*TRAJ_KEYS, "step", "reward", *advantages.batch_key, "advantage"))
            if c in schema.names]
    frame = check_keys(read_columns(source, schema, keys), source, advantages, problems)
    if scored:
        for column in (c for c in load_schema("scored")["columns"] if c["name"] in schema.names):
            values = read_columns(source, schema, [column["name"]]).column(0)
            check_numbers(pl.from_arrow(values), frame[ROW], column["name"], problems, nullable=column["nullable"],
                          non_negative=column["name"] in NON_NEGATIVE)
    rollouts = Rollouts(source, schema, frame, input_column, output_column, read_metadata(schema))
    if content or every_column:
        used = [input_column, output_column] + [c for c in ("response_ids", "token_entropy") if c in schema.names]
        for offset, chunk in rollouts.chunks(None if every_column else list(dict.fromkeys(used))):
            check_list_or_text(chunk.column(input_column), input_column, offset, problems)
            check_list_or_text(chunk.column(output_column), output_column, offset, problems)
            if "token_entropy" in chunk.column_names:
                ids = chunk.column("response_ids") if "response_ids" in chunk.column_names else None
                check_token_entropy(chunk.column("token_entropy"), offset, problems,
                                    required=entropy_source == "logged" and not scored, response_ids=ids)
    problems.raise_if_any()
    return rollouts


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def with_columns(rollouts: Rollouts, columns: dict[str, pa.Array], metadata: dict[str, Any],
                 rows: int = ROWS_PER_CHUNK) -> Iterator[pa.Table]:
    """The input, chunk by chunk, with `columns` set (replaced in place or appended, each as long as the file) and
    `metadata` as its `empg` key-value metadata: the scored table, streamed (write it with output.write_parquet)."""
    schema_meta = dict(rollouts.schema.metadata or {})
    schema_meta[METADATA_KEY] = json.dumps(metadata, sort_keys=True).encode()
    for offset, chunk in rollouts.chunks(rows=rows):
        for name, array in columns.items():
            part = array.slice(offset, chunk.num_rows)
            if name in chunk.column_names:
                chunk = chunk.set_column(chunk.column_names.index(name), name, part)
            else:
                chunk = chunk.append_column(name, part)
        yield chunk.replace_schema_metadata(schema_meta)
