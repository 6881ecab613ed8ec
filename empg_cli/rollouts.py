"""Read and validate rollouts (SPEC 2.1), write scored tables atomically with their `empg` metadata (SPEC 2.2, 5)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import AdvantageConfig
from .errors import BadInput, BadUsage
from .schema import check_column_types, check_required_columns, is_text, load_schema

TRAJ_KEYS = ("run", "iteration", "group_id", "traj_id")
GROUP_KEYS = ("run", "iteration", "group_id")
METADATA_KEY = b"empg"
ROW = "_row"  # 0-based row index of the input file; every error message counts rows this way


@dataclass
class Rollouts:
    """A validated rollouts file: the untouched Arrow table plus a canonical polars frame of the keys."""

    path: Path
    table: pa.Table
    """The file as read: its columns and order are written back unchanged."""
    steps: pl.DataFrame
    """One row per step in file order: _row, run, iteration, group_id, traj_id, step, reward, batch keys (+ advantage)."""
    input_column: str
    """prompt_ids, messages or prompt: the first present (ids win over text)."""
    output_column: str
    """response_ids or response."""
    metadata: dict[str, Any] | None
    """The file's own `empg` metadata, if it was written by empg."""


def read_table(path: Path) -> pa.Table:
    """The Parquet file as an Arrow table; a missing, unreadable or empty file is a BadInput."""
    if not path.exists():
        raise BadInput(path, "no such file")
    if path.is_dir():
        raise BadInput(path, "is a directory, not a Parquet file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise BadInput(path, f"cannot be read as Parquet ({str(exc).splitlines()[0]})") from exc
    if table.num_rows == 0:
        raise BadInput(path, "has no rows")
    return table


def read_metadata(table: pa.Table) -> dict[str, Any] | None:
    """The `empg` key-value metadata of a table, parsed, or None."""
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None


def _first(mask: pl.Series) -> int | None:
    """Index of the first True in a boolean series, or None."""
    hits = mask.fill_null(False).arg_true()
    return int(hits[0]) if len(hits) else None


def _describe_traj(row: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={row[k]!r}" for k in TRAJ_KEYS) + ")"


def _key_frame(table: pa.Table, path: Path, extra: tuple[str, ...]) -> pl.DataFrame:
    """The key columns as polars, defaults filled for absent run/iteration, nulls in ids rejected."""
    n = table.num_rows
    cols: dict[str, Any] = {ROW: np.arange(n, dtype=np.int64)}
    for name in ("run", "iteration", "group_id", "traj_id", "step", "reward", *extra):
        if name in table.column_names:
            cols[name] = pl.from_arrow(table.column(name))
    frame = pl.DataFrame(cols)
    if "run" not in frame.columns:
        frame = frame.with_columns(run=pl.lit("default"))
    if "iteration" not in frame.columns:
        frame = frame.with_columns(iteration=pl.lit(0, pl.Int64))
    frame = frame.with_columns(pl.col("run", "group_id", "traj_id").cast(pl.String), pl.col("iteration", "step").cast(pl.Int64),
                               pl.col("reward").cast(pl.Float64))
    for name in ("run", "iteration", "group_id", "traj_id", "step", *extra):
        row = _first(frame[name].is_null())
        if row is not None:
            raise BadInput(path, "is null; ids and keys must be set on every row", column=name, row=row)
    return frame


def _check_steps(frame: pl.DataFrame, path: Path) -> None:
    """Steps are 0..T-1 with no duplicates and no gaps in every trajectory."""
    row = _first(frame["step"] < 0)
    if row is not None:
        raise BadInput(path, f"step is {frame['step'][row]}; steps are 0-based", column="step", row=row)
    dup = _first(frame.select(pl.struct(*TRAJ_KEYS, "step").is_duplicated()).to_series())
    if dup is not None:
        first = frame.filter(pl.all_horizontal(pl.col(k) == frame[k][dup] for k in (*TRAJ_KEYS, "step")))
        raise BadInput(path, f"step {frame['step'][dup]} appears twice in this trajectory (rows "
                             f"{', '.join(map(str, first[ROW].to_list()[:5]))})", column="step",
                       trajectory=_describe_traj(frame.row(dup, named=True)), row=int(first[ROW][0]))
    gaps = (frame.group_by(TRAJ_KEYS, maintain_order=True)
            .agg(pl.col(ROW).min(), pl.col("step").max().alias("last"), pl.len().alias("n"),
                 pl.col("step").sort().alias("steps"))
            .filter(pl.col("last") != pl.col("n") - 1))
    if gaps.height:
        bad = gaps.row(0, named=True)
        shown = ", ".join(map(str, bad["steps"][:8])) + (", ..." if len(bad["steps"]) > 8 else "")
        raise BadInput(path, f"steps are {shown}; expected 0..{bad['n'] - 1} with no gaps", column="step",
                       trajectory=_describe_traj(bad), row=bad[ROW])


def _check_value_per_trajectory(frame: pl.DataFrame, path: Path, column: str, reward_agg: str | None) -> None:
    """Finite values; at least one per trajectory; equal within the trajectory unless summed."""
    row = _first(frame[column].is_nan() | frame[column].is_infinite())
    if row is not None:
        raise BadInput(path, f"{column} is {frame[column][row]}; must be a finite number", column=column, row=row)
    per_traj = frame.group_by(TRAJ_KEYS, maintain_order=True).agg(
        pl.col(ROW).min(), pl.col(column).drop_nulls().n_unique().alias("distinct"),
        pl.col(column).drop_nulls().unique(maintain_order=True).head(3).alias("values"))
    missing = per_traj.filter(pl.col("distinct") == 0)
    if missing.height:
        bad = missing.row(0, named=True)
        raise BadInput(path, f"{column} is null on every step of this trajectory", column=column,
                       trajectory=_describe_traj(bad), row=bad[ROW])
    if reward_agg != "sum":
        unequal = per_traj.filter(pl.col("distinct") > 1)
        if unequal.height:
            bad = unequal.row(0, named=True)
            hint = "; pass --reward-agg sum to sum per-step rewards" if column == "reward" else ""
            raise BadInput(path, f"{column} differs within this trajectory ({', '.join(map(str, bad['values']))})"
                                 f"{hint}", column=column, trajectory=_describe_traj(bad), row=bad[ROW])


def _check_nonempty(table: pa.Table, path: Path, column: str) -> None:
    """No nulls, no empty strings or lists in the chosen prompt/response column."""
    array = table.column(column)
    row = _first(pl.from_arrow(array.is_null()))
    if row is not None:
        raise BadInput(path, "is null", column=column, row=row)
    lengths = pc.utf8_length(array) if is_text(array.type) else pc.list_value_length(array)
    row = _first(pl.from_arrow(pc.equal(lengths, 0)))
    if row is not None:
        raise BadInput(path, "is empty; every step needs at least one token here", column=column, row=row)
    if column == "messages":
        flat = pc.list_flatten(array)
        for part in ("role", "content"):
            nulls = pc.is_null(pc.struct_field(flat, part))
            hit = _first(pl.from_arrow(nulls))
            if hit is not None:
                parent = pc.list_parent_indices(array).to_numpy()[hit]
                raise BadInput(path, f"a message has a null {part}", column=column, row=int(parent))


def _check_token_entropy(table: pa.Table, path: Path, required: bool) -> None:
    """Logged entropies: finite, >= 0, one per response token (when response_ids say how many)."""
    if "token_entropy" not in table.column_names:
        if required:
            raise BadInput(path, "--entropy-source logged needs the column 'token_entropy' "
                                 "(per-token entropies logged at generation time)")
        return
    array = table.column("token_entropy")
    if required:
        row = _first(pl.from_arrow(array.is_null()))
        if row is None:
            row = _first(pl.from_arrow(pc.equal(pc.list_value_length(array), 0)))
        if row is not None:
            raise BadInput(path, "has no entropies on this row; --entropy-source logged needs them on every row",
                           column="token_entropy", row=row)
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
    if bad.size:
        row = int(pc.list_parent_indices(array).to_numpy()[bad[0]])
        raise BadInput(path, f"entropy {values[bad[0]]} is not a finite number >= 0 (nats)", column="token_entropy",
                       row=row)
    if "response_ids" in table.column_names:
        mismatch = pc.and_(pc.is_valid(array), pc.not_equal(pc.list_value_length(array),
                                                            pc.list_value_length(table.column("response_ids"))))
        row = _first(pl.from_arrow(mismatch))
        if row is not None:
            n_ent = len(array[row].as_py())
            n_ids = len(table.column("response_ids")[row].as_py())
            raise BadInput(path, f"has {n_ent} entropies for {n_ids} response_ids", column="token_entropy", row=row)


def read_rollouts(path: Path, advantages: AdvantageConfig, *, entropy_source: str = "model",
                  scored: bool = False) -> Rollouts:
    """Read and validate a rollouts file (or, with `scored`, a scored file) per SPEC 2.1.

    Raises BadInput naming the file, column and first offending row or trajectory.
    """
    table = read_table(path)
    check_column_types(table, path, "scored" if scored else "rollouts")
    input_column, output_column = check_required_columns(table, path)
    new_columns = [c["name"] for c in load_schema("scored")["columns"]]
    if scored:
        missing = [c for c in new_columns if c not in table.column_names]
        if missing:
            raise BadInput(path, f"is not a scored file: column '{missing[0]}' is missing; make one with `empg score`")
    else:
        present = [c for c in new_columns if c in table.column_names]
        if present:
            raise BadInput(path, "is already present: this looks like a scored file; recompute advantages with "
                                 "`empg advantages`, or drop the column", column=present[0])
    for key in advantages.batch_key:
        if key not in table.column_names and key not in ("run", "iteration"):
            raise BadUsage(f"--batch-key column '{key}' is not in {path}")
    extra = tuple(k for k in advantages.batch_key if k not in TRAJ_KEYS and k != "step")
    if advantages.estimator == "column":
        if "advantage" not in table.column_names:
            raise BadInput(path, "--estimator column needs the column 'advantage'")
        extra += ("advantage",) if "advantage" not in extra else ()
    frame = _key_frame(table, path, tuple(dict.fromkeys(c for c in extra if c != "advantage")))
    if advantages.estimator == "column":
        frame = frame.with_columns(advantage=pl.from_arrow(table.column("advantage")).cast(pl.Float64))
    _check_steps(frame, path)
    _check_value_per_trajectory(frame, path, "reward", advantages.reward_agg)
    if advantages.estimator == "column":
        _check_value_per_trajectory(frame, path, "advantage", None)
    if not scored:
        _check_nonempty(table, path, input_column)
        _check_nonempty(table, path, output_column)
        _check_token_entropy(table, path, required=entropy_source == "logged")
    return Rollouts(path, table, frame, input_column, output_column, read_metadata(table))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def check_output_path(input_path: Path, output_path: Path, overwrite: bool) -> None:
    """Refuse to write over the input, over an existing file without --overwrite, or into a missing folder."""
    if output_path.resolve() == input_path.resolve():
        raise BadUsage(f"output {output_path} is the input file; empg never modifies its input (choose another -o)")
    if output_path.exists() and not overwrite:
        raise BadUsage(f"output {output_path} exists; pass --overwrite to replace it")
    if not output_path.parent.is_dir():
        raise BadUsage(f"output folder {output_path.parent} does not exist")


def write_table_atomic(table: pa.Table, output_path: Path, metadata: dict[str, Any]) -> None:
    """Write Parquet to a temporary file beside the output, then rename it into place (SPEC 5)."""
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[METADATA_KEY] = json.dumps(metadata, sort_keys=True).encode()
    table = table.replace_schema_metadata(schema_meta)
    fd, tmp = tempfile.mkstemp(prefix=f".{output_path.name}.", suffix=".tmp", dir=output_path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, output_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
