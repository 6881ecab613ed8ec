"""Any table (JSON lines, Parquet or CSV) whose fields `--map COLUMN=SOURCE_FIELD` names as rollouts columns.

Source fields already named like a rollouts column need no mapping; the others are carried through. The fidelity
follows the input column: token ids are exact, messages are re-rendered, text is re-tokenised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import polars as pl

from ..errors import BadInput, BadUsage
from .common import ROLLOUT_TYPES, Converted, Options, each_file, flat_jsonl, rollouts_frame

PATTERNS = {"jsonl": "*.jsonl", "parquet": "*.parquet", "csv": "*.csv"}


def _reader(kind: str):
    def read_file(path: Path, options: Options) -> pl.DataFrame:
        try:
            if kind == "jsonl":
                raw = flat_jsonl([path], ()).drop("_file")
            elif kind == "parquet":
                raw = pl.read_parquet(path)
            else:
                raw = pl.read_csv(path, infer_schema_length=None)
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise BadInput(path, f"cannot be read as {kind} ({str(exc).splitlines()[0]})") from None
        for column, field in options.mapping.items():
            if field not in raw.columns:
                raise BadInput(path, f"--map {column}={field}: no field '{field}' (fields: {', '.join(raw.columns)})")
        renamed = raw.rename({field: column for column, field in options.mapping.items()})
        columns = {c: renamed[c] for c in ROLLOUT_TYPES if c in renamed.columns}
        return rollouts_frame(columns, renamed.drop(list(columns)), options.run)
    return read_file


def fidelity_of(frame: pl.DataFrame) -> str:
    if "prompt_ids" in frame.columns and "response_ids" in frame.columns:
        return "ids"
    return "messages" if "messages" in frame.columns else "text"


def read(sources: Sequence[Path], options: Options, kind: str) -> Converted:
    for column in options.mapping:
        if column not in ROLLOUT_TYPES:
            raise BadUsage(f"--map {column}=...: '{column}' is not a rollouts column "
                           f"(one of {', '.join(ROLLOUT_TYPES)})")
    frame = each_file(sources, PATTERNS[kind], _reader(kind), options)
    return Converted(frame, fidelity_of(frame))
