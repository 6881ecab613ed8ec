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
from .common import FILE, Converted, Options, flat_jsonl, layout_files, rollouts_frame

FIDELITY = "text"
PATTERN = "*.jsonl"
FIELDS = ("input", "output", "score", "step")
UID = r"^(.*)_([^_]*)_(\d+)$"
"""`{uid}_{session}_{index}`, split from the right: group, trajectory, step."""


def read(sources: Sequence[Path], options: Options) -> Converted:
    raw = flat_jsonl(layout_files(sources, PATTERN), FIELDS)
    if "uid" in raw.columns:  # V1: the uid carries group, session and turn index
        parts = raw["uid"].cast(pl.String).str.extract_groups(UID).struct.unnest()
        bad = parts["1"].is_null().arg_true()
        if len(bad):
            raise BadInput(raw[FILE][bad[0]], f"uid {raw['uid'][bad[0]]!r} is not `{{uid}}_{{session}}_{{index}}`")
        keys = {"group_id": parts["1"], "traj_id": parts["2"], "step": parts["3"].cast(pl.Int64)}
    else:  # legacy: group = identical input within a file (its rows are in balanced-batch order)
        first = raw.with_row_index("_row").select(pl.col("_row").min().over(FILE, "input").alias("first"),
                                                  pl.int_range(pl.len()).over(FILE, "input").alias("traj"))
        keys = {"group_id": first["first"], "traj_id": first["traj"], "step": pl.repeat(0, raw.height, eager=True)}
    columns = {"iteration": raw["step"], **keys, "prompt": raw["input"], "response": raw["output"],
               "reward": raw["score"]}
    return Converted(rollouts_frame(columns, raw.drop(*FIELDS, "uid", FILE, strict=False), options.run), FIDELITY)
