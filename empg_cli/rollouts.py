"""Read and validate rollouts; stream scored tables with their `empg` metadata (docs/method.md)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import AdvantageConfig
from .errors import BadInput
from .schema import TRAJ_KEYS, check_column_types, check_required_columns, is_text, load_schema
from .validation import check_keys, first_true

METADATA_KEY = b"empg"


ROWS_PER_CHUNK = 16384
"""Rows read, scored and written at a time: memory is bounded by a chunk, not by the file."""


@dataclass
class Rollouts:
    """A validated rollouts file: its keys in memory, its content streamed chunk by chunk from disk."""

    path: Path
    schema: pa.Schema
    """The file's Arrow schema: its columns and order are written back unchanged."""
    steps: pl.DataFrame
    """One row per step in file order: _row, run, iteration, group_id, traj_id, step, reward, batch keys (+ advantage)."""
    input_column: str
    """prompt_ids, messages or prompt: the first present (ids win over text)."""
    output_column: str
    """response_ids or response."""
    metadata: dict[str, Any] | None
    """The file's own `empg` metadata, if it was written by empg."""

    def chunks(self, columns: list[str] | None = None, rows: int = ROWS_PER_CHUNK) -> Iterator[tuple[int, pa.Table]]:
        """(first row, table) for consecutive chunks of the file, with only `columns` (default: all) read."""
        first = 0
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=rows, columns=columns):
            yield first, pa.Table.from_batches([batch])
            first += batch.num_rows


def open_parquet(path: Path) -> pq.ParquetFile:
    """The Parquet file, opened; a missing, unreadable or empty file is a BadInput."""
    if not path.exists():
        raise BadInput(path, "no such file")
    if path.is_dir():
        raise BadInput(path, "is a directory, not a Parquet file")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise BadInput(path, f"cannot be read as Parquet ({str(exc).splitlines()[0]})") from exc
    if parquet.metadata.num_rows == 0:
        raise BadInput(path, "has no rows")
    return parquet


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """The Parquet file (or some of its columns) as one Arrow table, for data that fits in memory."""
    parquet = open_parquet(path)
    try:
        return parquet.read(columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadInput(path, f"cannot be read as Parquet ({str(exc).splitlines()[0]})") from exc


def read_metadata(source: pa.Table | pa.Schema) -> dict[str, Any] | None:
    """The `empg` key-value metadata of a table or schema, parsed, or None."""
    schema = source.schema if isinstance(source, pa.Table) else source
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None


def _check_nonempty(table: pa.Table, path: Path, column: str, offset: int) -> None:
    """No nulls, no empty strings or lists in the chosen prompt/response column (rows from `offset`)."""
    array = table.column(column)
    row = first_true(pl.from_arrow(array.is_null()))
    if row is not None:
        raise BadInput(path, "is null", column=column, row=offset + row)
    lengths = pc.utf8_length(array) if is_text(array.type) else pc.list_value_length(array)
    row = first_true(pl.from_arrow(pc.equal(lengths, 0)))
    if row is not None:
        raise BadInput(path, "is empty; every step needs at least one token here", column=column, row=offset + row)
    if column == "messages":
        flat = pc.list_flatten(array)
        for part in ("role", "content"):
            nulls = pc.is_null(pc.struct_field(flat, part))
            hit = first_true(pl.from_arrow(nulls))
            if hit is not None:
                parent = pc.list_parent_indices(array).to_numpy()[hit]
                raise BadInput(path, f"a message has a null {part}", column=column, row=offset + int(parent))


def check_token_entropy(table: pa.Table, path: Path, required: bool, offset: int) -> None:
    """Logged entropies (rows from `offset`): finite, >= 0, one per response token when response_ids say how many."""
    array = table.column("token_entropy")
    if required:
        row = first_true(pl.from_arrow(pc.or_kleene(array.is_null(), pc.equal(pc.list_value_length(array), 0))))
        if row is not None:
            raise BadInput(path, "has no entropies on this row; --entropy-source logged needs them on every row",
                           column="token_entropy", row=offset + row)
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
    if bad.size:
        row = int(pc.list_parent_indices(array).to_numpy()[bad[0]])
        raise BadInput(path, f"entropy {values[bad[0]]} is not a finite number >= 0 (nats)", column="token_entropy",
                       row=offset + row)
    if "response_ids" in table.column_names:
        n_entropies = pc.list_value_length(array)
        n_ids = pc.list_value_length(table.column("response_ids"))
        row = first_true(pl.from_arrow(pc.and_(pc.is_valid(array), pc.not_equal(n_entropies, n_ids))))
        if row is not None:
            raise BadInput(path, f"has {n_entropies[row]} entropies for {n_ids[row]} response_ids",
                           column="token_entropy", row=offset + row)


def open_rollouts(path: Path, advantages: AdvantageConfig, *, entropy_source: str = "model",
                  scored: bool = False) -> Rollouts:
    """Read and validate a rollouts file (or, with `scored`, a scored file) per the data model of docs/method.md.

    The key columns are read whole; prompt, response and entropy columns are checked chunk by chunk.
    Raises BadInput naming the file, column and first offending row or trajectory.
    """
    schema = open_parquet(path).schema_arrow
    check_column_types(schema, path, "scored" if scored else "rollouts")
    input_column, output_column = check_required_columns(schema, path)
    new_columns = [c["name"] for c in load_schema("scored")["columns"]]
    if scored:
        missing = [c for c in new_columns if c not in schema.names]
        if missing:
            raise BadInput(path, f"is not a scored file: column '{missing[0]}' is missing; make one with `empg score`")
    else:
        present = [c for c in new_columns if c in schema.names]
        if present:
            raise BadInput(path, "is already present: this looks like a scored file; recompute advantages with "
                                 "`empg advantages`, or drop the column", column=present[0])
    if entropy_source == "logged" and "token_entropy" not in schema.names:
        raise BadInput(path, "--entropy-source logged needs the column 'token_entropy' "
                             "(per-token entropies logged at generation time)")
    keys = [c for c in dict.fromkeys((*TRAJ_KEYS, "step", "reward", *advantages.batch_key, "advantage"))
            if c in schema.names]
    frame = check_keys(read_table(path, keys), path, advantages)
    rollouts = Rollouts(path, schema, frame, input_column, output_column, read_metadata(schema))
    if not scored:
        content = [input_column, output_column] + [c for c in ("response_ids", "token_entropy") if c in schema.names]
        for offset, chunk in rollouts.chunks(list(dict.fromkeys(content))):
            _check_nonempty(chunk, path, input_column, offset)
            _check_nonempty(chunk, path, output_column, offset)
            if "token_entropy" in chunk.column_names:
                check_token_entropy(chunk, path, entropy_source == "logged", offset)
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
