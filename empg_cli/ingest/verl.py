"""verl's rollout dump (`trainer.rollout_data_dir=DIR`): `DIR/{global_step}.jsonl`, one line per sample.

verl's `RayPPOTrainer._dump_generations` writes, per line: `input` and `output` (the prompt and response decoded
with `skip_special_tokens=True`), `gts` (ground truth), `score` (the sequence score), `step` (the global step) and
every reward-extra key. The V1 trainer adds `uid` = `{uid}_{session}_{index}`. The legacy dump has no uid, and its
rows come in the order of the balanced batch, not the sampler's: a group is recovered as the samples with the
identical `input` in one file, one trajectory per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import polars as pl

from ..errors import BadInput
from .common import Converted, Options, each_file, flat_jsonl, rollouts_frame

FIDELITY = "text"
PATTERN = "*.jsonl"
FIELDS = ("input", "output", "score", "step")
UID = r"^(.*)_([^_]*)_(\d+)$"
"""`{uid}_{session}_{index}`, split from the right: group, trajectory, step."""


def read_file(path: Path, options: Options) -> pl.DataFrame:
    raw = flat_jsonl(path, FIELDS)
    if "uid" in raw.columns:  # V1: the uid carries group, session and turn index
        parts = raw["uid"].cast(pl.String).str.extract_groups(UID).struct.unnest()
        bad = parts["1"].is_null().arg_true()
        if len(bad):
            raise BadInput(path, f"line {bad[0] + 1} has uid {raw['uid'][bad[0]]!r}, not `{{uid}}_{{session}}_{{index}}`")
        keys = {"group_id": parts["1"], "traj_id": parts["2"], "step": parts["3"].cast(pl.Int64)}
    else:  # legacy: group = identical input within the file (rows are in balanced-batch order)
        first = raw.with_row_index("_row").select(pl.col("_row").min().over("input").alias("first"),
                           pl.int_range(pl.len()).over("input").alias("traj"))
        keys = {"group_id": first["first"], "traj_id": first["traj"], "step": pl.repeat(0, raw.height, eager=True)}
    columns = {"iteration": raw["step"], **keys, "prompt": raw["input"], "response": raw["output"],
               "reward": raw["score"]}
    return rollouts_frame(columns, raw.drop(*FIELDS, "uid", strict=False), options.run)


def read(sources: Sequence[Path], options: Options) -> Converted:
    return Converted(each_file(sources, PATTERN, read_file, options), FIDELITY)
