"""AReaL's rollout dump (`rollout.dump_to_file=true`): `LOG_PATH/rollout/{version}/{task_id}.jsonl`, a line a sample.

AReaL's `WorkflowExecutor._dump_trajectory` appends, per sample, `task_id`, `sample_idx`, `seqlen`, `prompt_len`,
`head_version`, `tail_version`, `reward`, `prompt` and `completion` (decoded with `skip_special_tokens=False`) to
the file of its task in the folder of its newest policy version. The file (one task) is the group, `sample_idx`
the trajectory, one step each; the version folder is the iteration. Given a folder, the `rollout/` files are read
(`eval-rollout/` holds evaluation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import polars as pl

from ..errors import BadInput
from .common import FILE, Converted, Options, flat_jsonl, preferred_files, rollouts_frame

FIDELITY = "text"
PATTERN = "*.jsonl"
FIELDS = ("task_id", "sample_idx", "reward", "prompt", "completion")


def read(sources: Sequence[Path], options: Options) -> Converted:
    raw = flat_jsonl(preferred_files(sources, PATTERN, lambda f: f.parent.parent.name == "rollout"), FIELDS)
    version = raw[FILE].str.extract(r"(\d+)/[^/]+\.jsonl$").cast(pl.Int64)
    if version.null_count():
        raise BadInput(raw[FILE][version.is_null().arg_true()[0]], "is not in a policy-version folder "
                                                                   "(rollout/{version}/{task_id}.jsonl)")
    columns = {"iteration": version, "group_id": raw["task_id"], "traj_id": raw["sample_idx"],
               "step": pl.repeat(0, raw.height, eager=True), "prompt": raw["prompt"], "response": raw["completion"],
               "reward": raw["reward"]}
    return Converted(rollouts_frame(columns, raw.drop(*FIELDS, FILE), options.run), FIDELITY)
