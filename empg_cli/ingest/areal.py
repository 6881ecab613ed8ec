"""AReaL's rollout dump: `rollout/{version}/{task_id}.jsonl`, one line per sample of the task at that policy version.

Each line holds `task_id`, `sample_idx`, `reward`, `prompt` and `completion`, the text decoded with its special
tokens kept. The file (one task) is the group, `sample_idx` the trajectory, one step each; the version folder is
the iteration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import polars as pl

from ..errors import BadInput
from .common import FILE, Converted, Options, flat_jsonl, layout_files, rollouts_frame

FIDELITY = "text"
PATTERN = "*.jsonl"
FIELDS = ("task_id", "sample_idx", "reward", "prompt", "completion")


def read(sources: Sequence[Path], options: Options) -> Converted:
    raw = flat_jsonl(layout_files(sources, PATTERN), FIELDS)
    version = raw[FILE].str.extract(r"(\d+)/[^/]+\.jsonl$").cast(pl.Int64)
    if version.null_count():
        raise BadInput(raw[FILE][version.is_null().arg_true()[0]], "is not in a policy-version folder "
                                                                   "(rollout/{version}/{task_id}.jsonl)")
    columns = {"iteration": version, "group_id": raw["task_id"], "traj_id": raw["sample_idx"],
               "step": pl.repeat(0, raw.height, eager=True), "prompt": raw["prompt"], "response": raw["completion"],
               "reward": raw["reward"]}
    return Converted(rollouts_frame(columns, raw.drop(*FIELDS, FILE), options.run), FIDELITY)
