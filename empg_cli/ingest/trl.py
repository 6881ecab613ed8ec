"""TRL's completion logs (`GRPOConfig(log_completions=True)`): `OUTPUT_DIR/completions/completions_{step:05d}.parquet`.

`GRPOTrainer` writes one row per completion: `step` (the global step, an integer or its text), `prompt` and
`completion` (decoded with special tokens skipped), one column per reward function (NaN where it returned None),
then the `log_extra` columns and `advantage`. Rows come in blocks of
`num_generations` completions of one prompt, and no column names the group: `--group-size` gives it. The reward is
TRL's own: the weighted sum of the reward-function columns, NaN skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from ..errors import BadInput, BadUsage
from .common import Converted, Options, each_file, rollouts_frame

FIDELITY = "text"
PATTERN = "completions_*.parquet"
FIELDS = ("step", "prompt", "completion")


def reward_columns(frame: pl.DataFrame, count: int | None) -> list[str]:
    """The reward-function columns. TRL writes them right after `completion`, then the `log_extra` columns (sorted
    by name), then `advantage`: with `count` weights they are the first `count` columns, else every numeric one."""
    names = frame.columns
    end = names.index("advantage") if "advantage" in names else len(names)
    between = names[names.index("completion") + 1:end]
    return between[:count] if count is not None else [c for c in between if frame[c].dtype.is_numeric()]


def _runs_of_prompts(prompts: pl.Series) -> int:
    """Length of the first run of identical consecutive prompts (a hint for --group-size)."""
    changes = (prompts != prompts.shift(1)).fill_null(True).arg_true()
    return int(changes[1]) if len(changes) > 1 else prompts.len()


def read_file(path: Path, options: Options) -> pl.DataFrame:
    raw = pl.read_parquet(path)
    for name in FIELDS:
        if name not in raw.columns:
            raise BadInput(path, f"has no column '{name}' (TRL's completions log has step, prompt, completion)")
    size = options.group_size
    if size is None:
        raise BadUsage(f"{path}: TRL's log does not record groups; pass --group-size (the trainer's "
                       f"num_generations; here prompts repeat in runs of {_runs_of_prompts(raw['prompt'])})")
    if raw.height % size:
        first = raw.height - raw.height % size
        raise BadInput(path, f"has {raw.height} rows, not a multiple of --group-size {size}: the group "
                             f"starting at row {first} is incomplete", row=first)
    weights = options.reward_weights
    rewards = reward_columns(raw, None if weights is None else len(weights))
    weights = weights or (1.0,) * len(rewards)
    bad = [c for c in rewards if not raw[c].dtype.is_numeric()]
    if len(weights) != len(rewards) or bad:
        raise BadUsage(f"--reward-weights has {len(weights)} weights, and {path} has these reward-function columns "
                       f"after 'completion': {', '.join(rewards) or 'none'}"
                       f"{' (not numeric: ' + ', '.join(bad) + ')' if bad else ''}")
    values = raw.select(rewards).to_numpy().astype(np.float64) if rewards else np.zeros((raw.height, 0))
    row = np.arange(raw.height)
    columns = {"iteration": raw["step"].cast(pl.Int64), "group_id": row // size, "traj_id": row % size,
               "step": np.zeros(raw.height, dtype=np.int64), "prompt": raw["prompt"],
               "response": raw["completion"], "reward": np.nansum(values * np.asarray(weights), axis=1)}
    return rollouts_frame(columns, raw.drop(*FIELDS), options.run)


def read(sources: Sequence[Path], options: Options) -> Converted:
    return Converted(each_file(sources, PATTERN, read_file, options), FIDELITY)
