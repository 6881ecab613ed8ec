"""`empg convert`: a trainer's layout -> a validated rollouts frame, written atomically with its provenance."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import polars as pl

from .. import __version__
from ..errors import BadInput, BadUsage
from ..output import atomic_output, write_parquet
from ..config import AdvantageConfig
from ..rollouts import METADATA_KEY
from ..schema import GROUP_KEYS, SCHEMA_VERSION, TRAJ_KEYS, check_column_types, check_required_columns
from ..validation import Problems, check_keys, check_list_or_text
from . import areal, art, prime_rl, rllm, table, trl, verl
from .common import Converted, Options
from .detect import FORMATS, TABLES, detect

READERS = {"verl": verl.read, "trl": trl.read, "prime-rl": prime_rl.read, "art": art.read, "rllm": rllm.read,
           "areal": areal.read}

TEXT_WARNING = ("{path} holds text that the trainer decoded from its token ids (fidelity 'text'): re-tokenising it "
                "need not give the ids the policy sampled, so its entropies are approximate; log token ids for "
                "exact ones (docs/ingest.md)")
"""What `empg score` says once about a `text` input."""


@dataclass
class ConvertSummary:
    """What `convert_file` wrote, for the closing summary."""

    output: Path
    format: str
    fidelity: str
    rows: int
    trajectories: int
    groups: int
    iterations: int


def options_from(run: str = "default", group_size: int | None = None,
                 reward_weights: str | Sequence[float] | None = None,
                 map: dict[str, str] | Iterable[str] | None = None) -> Options:
    """Options from the flags' forms: weights as `1,0.5` or numbers, map as {column: field} or `COLUMN=FIELD`s."""
    if group_size is not None and group_size < 1:
        raise BadUsage(f"--group-size must be >= 1, not {group_size}")
    if isinstance(reward_weights, str):
        try:
            reward_weights = [float(w) for w in reward_weights.split(",") if w.strip()]
        except ValueError:
            raise BadUsage(f"--reward-weights takes numbers separated by commas, not {reward_weights!r}") from None
    mapping: dict[str, str] = {}
    if isinstance(map, dict):
        mapping = dict(map)
    else:
        for item in map or []:
            column, sep, field = item.partition("=")
            if not sep or not column.strip() or not field.strip():
                raise BadUsage(f"--map takes COLUMN=SOURCE_FIELD, not {item!r}")
            mapping[column.strip()] = field.strip()
    return Options(run=run, group_size=group_size,
                   reward_weights=tuple(reward_weights) if reward_weights is not None else None, mapping=mapping)


def _paths(source: str | Path | Sequence[str | Path]) -> list[Path]:
    return [Path(s) for s in ([source] if isinstance(source, (str, Path)) else source)]


def validate_converted(frame: pl.DataFrame, name: str) -> pl.DataFrame:
    """The converted frame is a valid rollouts table, checked by the same code as a rollouts file; its keys."""
    arrow = frame.to_arrow()
    check_column_types(arrow.schema, name, "rollouts")
    input_column, output_column = check_required_columns(arrow.schema, name)
    problems = Problems(name)
    for column in (input_column, output_column):
        check_list_or_text(arrow.column(column), column, 0, problems)
    keys = check_keys(arrow.select([c for c in (*TRAJ_KEYS, "step", "reward") if c in arrow.column_names]), name,
                      AdvantageConfig(), problems)
    problems.raise_if_any()
    return keys


def convert_sources(source: str | Path | Sequence[str | Path], from_: str | None = None,
                    **options: Any) -> tuple[str, Converted]:
    """(format, converted rows and fidelity) of what a trainer wrote."""
    paths = _paths(source)
    opts = options_from(**options)
    if from_ is not None and from_ not in FORMATS:
        raise BadUsage(f"--from {from_!r} is not a format: one of {', '.join(FORMATS)}")
    fmt = from_ or detect(paths, mapped=bool(opts.mapping))
    if opts.mapping and fmt not in TABLES:
        raise BadUsage(f"--map is for generic tables (--from {'|'.join(TABLES)}); {fmt} is read field by field")
    converted = table.read(paths, opts, fmt) if fmt in TABLES else READERS[fmt](paths, opts)
    if converted.frame.height == 0:
        raise BadInput(paths[0], f"has no steps to convert as {fmt}")
    return fmt, converted


def convert(source: str | Path | Sequence[str | Path], from_: str | None = None, **options: Any) -> pl.DataFrame:
    """A validated rollouts frame from the files a trainer wrote (SOURCE: files or the trainer's folder).

    options: run, group_size, reward_weights, map (see `empg convert --help`)."""
    paths = _paths(source)
    fmt, converted = convert_sources(paths, from_, **options)
    validate_converted(converted.frame, f"{paths[0]} (as {fmt})")
    return converted.frame


def default_output(source: Path) -> Path:
    """`NAME.rollouts.parquet` beside the source file or folder."""
    source = source.resolve()
    return source.with_name(f"{source.stem if source.is_file() else source.name}.rollouts.parquet")


def convert_file(source: str | Path | Sequence[str | Path], output: Path | None = None, from_: str | None = None, *,
                 overwrite: bool = False, **options: Any) -> ConvertSummary:
    """Convert and write the rollouts Parquet atomically, its `empg` metadata naming the source format and fidelity."""
    paths = _paths(source)
    output = Path(output) if output is not None else default_output(paths[0])
    with atomic_output(output, overwrite=overwrite, inputs=paths) as temp:
        fmt, converted = convert_sources(paths, from_, **options)
        frame = converted.frame
        keys = validate_converted(frame, f"{paths[0]} (as {fmt})")
        metadata = {"schema_version": SCHEMA_VERSION, "tool": "empg", "tool_version": __version__,
                    "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "source": {"format": fmt, "fidelity": converted.fidelity, "paths": [p.name for p in paths]},
                    "fidelity": converted.fidelity}
        arrow = frame.to_arrow()
        stamp = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()}
        write_parquet(temp, [arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), **stamp})])
    return ConvertSummary(output, fmt, converted.fidelity, keys.height, keys.select(TRAJ_KEYS).n_unique(),
                          keys.select(GROUP_KEYS).n_unique(), keys["iteration"].n_unique())
