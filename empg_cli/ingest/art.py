"""OpenPipe ART's trajectory logs (parquet format v2): `trajectories/{split}/{step:04d}.parquet`.

One row per trajectory: `group_index`, `trajectory_index`, `reward`, and `messages`, a list of
{role, content, tool_calls, tool_call_id, trainable}. The model's turns are the assistant messages marked
`trainable`, in order; each is one step, its prompt the messages before it, its response its content (its tool
calls as JSON when it has no content). The split folder and the file's step number give the iteration's rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import polars as pl

from ..errors import BadInput
from ..validation import first_true
from .common import Converted, Options, each_file, number_in, rollouts_frame

FIDELITY = "messages"
PATTERN = "*.parquet"
FIELDS = ("group_index", "trajectory_index", "reward", "messages")


def _text(message: pl.Expr, tool_calls: pl.DataType) -> pl.Expr:
    """A message's text; a tool call without text becomes its JSON."""
    calls = message.struct.field("tool_calls")
    calls = calls if tool_calls == pl.String else calls.map_elements(json.dumps, return_dtype=pl.String)
    return pl.coalesce(pl.when(message.struct.field("content") != "").then(message.struct.field("content")),
                       calls, pl.lit(""))


def read_file(path: Path, options: Options) -> pl.DataFrame:
    raw = pl.read_parquet(path)
    for name in FIELDS:
        if name not in raw.columns:
            raise BadInput(path, f"has no column '{name}' (ART's trajectory parquet has {', '.join(FIELDS)})")
    row = first_true(raw["messages"].is_null())
    if row is not None:
        raise BadInput(path, "is null", column="messages", row=row)
    fields = raw.schema["messages"].inner
    tool_calls = dict(fields).get("tool_calls", pl.String)
    element = pl.element()
    if "tool_calls" not in dict(fields):
        element = element.struct.with_fields(tool_calls=pl.lit(None, pl.String))
    raw = raw.with_row_index("_row").with_columns(pl.col("messages").list.eval(
        pl.struct(role=element.struct.field("role"), content=_text(element, tool_calls))).alias("_history"))
    turns = (raw.select("_row", message=pl.col("messages")).explode("message")
             .with_columns(position=pl.int_range(pl.len()).over("_row"))
             .filter((pl.col("message").struct.field("role") == "assistant")
                     & pl.col("message").struct.field("trainable").fill_null(False))
             .select("_row", "position", step=pl.int_range(pl.len()).over("_row")))
    steps = turns.join(raw, on="_row", how="left", maintain_order="left")
    history = pl.col("_history")
    columns = steps.select(
        iteration=pl.lit(number_in(path, r"(\d+)\.parquet$"), pl.Int64),
        group_id=pl.lit(f"{path.parent.name}/") + pl.col("group_index").cast(pl.String),
        traj_id="trajectory_index", step="step", messages=history.list.slice(0, pl.col("position")),
        response=history.list.get(pl.col("position")).struct.field("content"), reward="reward")
    return rollouts_frame(columns.to_dict(), steps.drop("_row", "position", "step", "_history", *FIELDS),
                          options.run)


def read(sources: Sequence[Path], options: Options) -> Converted:
    return Converted(each_file(sources, PATTERN, read_file, options), FIDELITY)
