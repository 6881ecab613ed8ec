"""AReaL's rollout dump: `rollout/{version}/{task_id}.jsonl`, one line per sample of the task at that policy version.

Each line holds `task_id`, `sample_idx`, `reward`, `prompt` and `completion`, the text decoded with its special
tokens kept. The file (one task) is the group, `sample_idx` the trajectory, one step each; the version folder is
the iteration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import polars as pl

from .common import Converted, Options, each_file, flat_jsonl, number_in, rollouts_frame

FIDELITY = "text"
PATTERN = "*.jsonl"
FIELDS = ("task_id", "sample_idx", "reward", "prompt", "completion")


def read_file(path: Path, options: Options) -> pl.DataFrame:
    raw = flat_jsonl(path, FIELDS)
    version = number_in(path, r"(\d+)/[^/]+\.jsonl$")
    columns = {"iteration": pl.repeat(version, raw.height, eager=True), "group_id": raw["task_id"],
               "traj_id": raw["sample_idx"], "step": pl.repeat(0, raw.height, eager=True), "prompt": raw["prompt"],
               "response": raw["completion"], "reward": raw["reward"]}
    return rollouts_frame(columns, raw.drop(*FIELDS), options.run)


def read(sources: Sequence[Path], options: Options) -> Converted:
    return Converted(each_file(sources, PATTERN, read_file, options), FIDELITY)
