"""Which trainer wrote a source: told by the layout's file names, then by the fields of its first file."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path
from typing import Sequence

import pyarrow.parquet as pq

from ..errors import BadInput, BadUsage
from . import areal, art, prime_rl, rllm, trl, verl
from .common import json_lines, layout_files

TRAINERS = {"verl": "rollout_data_dir/{global_step}.jsonl with input, output, score, step",
            "trl": "completions/completions_{step:05d}.parquet",
            "prime-rl": "rollouts/step_N/train/all/traces.jsonl",
            "art": "trajectories/{split}/{step:04d}.parquet with group_index, trajectory_index, messages",
            "rllm": "episodes/*_step_{s}_epoch_{e}/episode_*.json",
            "areal": "rollout/{version}/{task_id}.jsonl with task_id, sample_idx, prompt, completion"}
TABLES = ("jsonl", "parquet", "csv")
FORMATS = (*TRAINERS, *TABLES)


def _fields(path: Path) -> list[str]:
    """Field names of the first record of a JSON-lines or Parquet file ([] if it has none or cannot be read)."""
    try:
        if path.suffix == ".parquet":
            return pq.read_schema(path).names
        for _, record in json_lines(path):
            return list(record)
    except (BadInput, OSError, ValueError):
        pass
    return []


def _first_per_folder(files, limit: int = 20) -> list[Path]:
    """The first file of each folder (a trainer writes one kind of file per folder), at most `limit` of them."""
    firsts: dict[Path, Path] = {}
    for f in files:
        firsts.setdefault(f.parent, f)
        if len(firsts) == limit:
            break
    return list(firsts.values())


def _choices() -> str:
    return "; ".join(f"{name} ({layout})" for name, layout in TRAINERS.items()) + \
        "; or a generic table: --from jsonl|parquet|csv with --map COLUMN=SOURCE_FIELD"


def detect(sources: Sequence[Path], mapped: bool = False) -> str:
    """The format of the sources; an unknown or ambiguous layout is a BadUsage listing the formats."""
    files = [f for f in layout_files(sources, "*") if f.is_file()]
    names = [f.name for f in files]
    if mapped:
        kinds = [f.suffix.lstrip(".") for f in files if f.suffix.lstrip(".") in TABLES]
        if kinds:
            return kinds[0]
    jsonl = _first_per_folder(f for f in files if f.suffix == ".jsonl" and f.name != prime_rl.PATTERN)
    parquet = _first_per_folder(f for f in files if f.suffix == ".parquet")
    jsonl_fields, parquet_fields = [set(_fields(f)) for f in jsonl], [set(_fields(f)) for f in parquet]
    trl_names = any(fnmatch(n, trl.PATTERN) for n in names)
    found = [name for name, hit in (
        ("verl", any(set(verl.FIELDS) <= fields for fields in jsonl_fields)),
        ("trl", trl_names),
        ("prime-rl", prime_rl.PATTERN in names),
        ("art", any(set(art.FIELDS) <= fields for fields in parquet_fields) and not trl_names),
        ("rllm", any(fnmatch(n, rllm.PATTERN) for n in names)),
        ("areal", any(set(areal.FIELDS) <= fields for fields in jsonl_fields)),
    ) if hit]
    if len(found) == 1:
        return found[0]
    seen = ", ".join(sorted({f.suffix or f.name for f in files})[:6]) or "no files"
    what = "; ".join(f"{f.name} has fields {', '.join(_fields(f)[:8]) or '(none readable)'}"
                     for f in (jsonl[:1] + parquet[:1]))
    where = ", ".join(map(str, sources))
    if found:
        raise BadUsage(f"{where} could be {' or '.join(found)}: pass --from. Formats: {_choices()}")
    raise BadUsage(f"cannot tell which trainer wrote {where} ({len(files)} file(s): {seen}"
                   f"{'; ' + what if what else ''}): pass --from. Formats: {_choices()}")
