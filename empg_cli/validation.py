"""Row-level checks of a rollouts key frame (docs/method.md, data model): ids set, steps 0..T-1, one reward per trajectory.

They work on a polars frame of the key columns, so a file (rollouts.open_rollouts) and an in-memory frame (the
library) are validated by the same code. Every failure is a BadInput naming the source, column and row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from .advantages import TRAJ as TRAJECTORY, trajectory_structure
from .config import AdvantageConfig
from .errors import BadInput, BadUsage
from .schema import TRAJ_KEYS

ROW = "_row"  # 0-based row index of the input file; every error message counts rows this way


def first_true(mask: pl.Series) -> int | None:
    """Index of the first True in a boolean series, or None."""
    hits = mask.fill_null(False).arg_true()
    return int(hits[0]) if len(hits) else None


def describe_trajectory(row: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={row[k]!r}" for k in TRAJ_KEYS) + ")"


def key_frame(table: pa.Table, path: Path, extra: tuple[str, ...]) -> pl.DataFrame:
    """The key columns as polars, defaults filled for absent run/iteration, nulls in ids rejected."""
    n = table.num_rows
    cols: dict[str, Any] = {ROW: np.arange(n, dtype=np.int64)}
    for name in (*TRAJ_KEYS, "step", "reward", "advantage", *extra):
        if name in table.column_names:
            cols[name] = pl.from_arrow(table.column(name))
    frame = pl.DataFrame(cols)
    if "run" not in frame.columns:
        frame = frame.with_columns(run=pl.lit("default"))
    if "iteration" not in frame.columns:
        frame = frame.with_columns(iteration=pl.lit(0, pl.Int64))
    frame = frame.with_columns(pl.col("run", "group_id", "traj_id").cast(pl.String), pl.col("iteration", "step").cast(pl.Int64),
                               pl.col("^(reward|advantage)$").cast(pl.Float64))
    for name in (*TRAJ_KEYS, "step", *extra):
        row = first_true(frame[name].is_null())
        if row is not None:
            raise BadInput(path, "is null; ids and keys must be set on every row", column=name, row=row)
    return frame


def check_steps(frame: pl.DataFrame, path: Path) -> None:
    """Steps are 0..T-1 with no duplicates and no gaps in every trajectory."""
    row = first_true(frame["step"] < 0)
    if row is not None:
        raise BadInput(path, f"step is {frame['step'][row]}; steps are 0-based", column="step", row=row)
    dup = first_true(frame.select(pl.struct(*TRAJ_KEYS, "step").is_duplicated()).to_series())
    if dup is not None:
        first = frame.filter(pl.all_horizontal(pl.col(k) == frame[k][dup] for k in (*TRAJ_KEYS, "step")))
        raise BadInput(path, f"step {frame['step'][dup]} appears twice in this trajectory (rows "
                             f"{', '.join(map(str, first[ROW].to_list()[:5]))})", column="step",
                       trajectory=describe_trajectory(frame.row(dup, named=True)), row=int(first[ROW][0]))
    gaps = (frame.group_by(TRAJ_KEYS, maintain_order=True)
            .agg(pl.col(ROW).min(), pl.col("step").max().alias("last"), pl.len().alias("n"),
                 pl.col("step").sort().alias("steps"))
            .filter(pl.col("last") != pl.col("n") - 1))
    if gaps.height:
        bad = gaps.row(0, named=True)
        shown = ", ".join(map(str, bad["steps"][:8])) + (", ..." if len(bad["steps"]) > 8 else "")
        raise BadInput(path, f"steps are {shown}; expected 0..{bad['n'] - 1} with no gaps", column="step",
                       trajectory=describe_trajectory(bad), row=bad[ROW])


def check_value_per_trajectory(frame: pl.DataFrame, path: Path, column: str, reward_agg: str | None) -> None:
    """Finite values; at least one per trajectory; equal within the trajectory unless summed."""
    row = first_true(frame[column].is_nan() | frame[column].is_infinite())
    if row is not None:
        raise BadInput(path, f"{column} is {frame[column][row]}; must be a finite number", column=column, row=row)
    per_traj = frame.group_by(TRAJ_KEYS, maintain_order=True).agg(
        pl.col(ROW).min(), pl.col(column).drop_nulls().n_unique().alias("distinct"),
        pl.col(column).drop_nulls().unique(maintain_order=True).head(3).alias("values"))
    missing = per_traj.filter(pl.col("distinct") == 0)
    if missing.height:
        bad = missing.row(0, named=True)
        raise BadInput(path, f"{column} is null on every step of this trajectory", column=column,
                       trajectory=describe_trajectory(bad), row=bad[ROW])
    if reward_agg != "sum":
        unequal = per_traj.filter(pl.col("distinct") > 1)
        if unequal.height:
            bad = unequal.row(0, named=True)
            hint = "; pass --reward-agg sum to sum per-step rewards" if column == "reward" else ""
            raise BadInput(path, f"{column} differs within this trajectory ({', '.join(map(str, bad['values']))})"
                                 f"{hint}", column=column, trajectory=describe_trajectory(bad), row=bad[ROW])


def check_keys(table: pa.Table, path: Path | str, advantages: AdvantageConfig) -> pl.DataFrame:
    """The key frame of a rollouts table, checked for what the advantages need: the batch-key and (for
    `--estimator column`) `advantage` columns present, ids set, steps 0..T-1, one reward (and advantage) per
    trajectory. `table` holds the key columns (extra columns are ignored)."""
    return checked_steps(table, path, advantages)[0]


def checked_steps(table: pa.Table, path: Path | str, advantages: AdvantageConfig,
                  ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """check_keys' frame and the trajectory structure its check computed (advantages.trajectory_structure), which
    advantages.advantage_table can reuse."""
    for key in advantages.batch_key:
        if key not in table.column_names and key not in ("run", "iteration"):
            raise BadUsage(f"--batch-key column '{key}' is not in {path}")
    if advantages.estimator == "column" and "advantage" not in table.column_names:
        raise BadInput(path, "--estimator column needs the column 'advantage'")
    extra = tuple(dict.fromkeys(k for k in advantages.batch_key if k not in TRAJ_KEYS and k != "step"))
    frame = key_frame(table, path, extra)
    structure = trajectory_structure(frame, list(advantages.batch_key))
    values = {"reward": advantages.reward_agg, **({"advantage": None} if advantages.estimator == "column" else {})}
    if not _all_trajectories_valid(frame.with_columns(structure[TRAJECTORY]), values):
        check_steps(frame, path)  # the detailed checks name the first offending row
        for column, agg in values.items():
            check_value_per_trajectory(frame, path, column, agg)
    return frame, structure


def _all_trajectories_valid(frame: pl.DataFrame, values: dict[str, str | None]) -> bool:
    """Whether check_steps and check_value_per_trajectory would both pass, from one group-by on the integer
    trajectory id (a fraction of their cost on valid data): T distinct steps from 0 to T-1; finite values, at least
    one per trajectory, equal unless summed (`values` maps each column to its reward_agg)."""
    step = pl.col("step")
    checks = [step.min() == 0, step.max() == pl.len() - 1, step.n_unique() == pl.len()]
    for column, agg in values.items():
        checks.append(pl.col(column).count() > 0)
        if agg != "sum":
            checks.append(pl.col(column).min() == pl.col(column).max())
    finite = pl.all_horizontal((pl.col(c).is_finite() | pl.col(c).is_null()).all() for c in values)
    per_trajectory = frame.group_by(TRAJECTORY).agg(pl.all_horizontal(checks).alias("ok"))
    return bool(frame.select(finite).item()) and bool(per_trajectory["ok"].all())


def check_step_entropy(entropy: pl.Series, path: Path | str) -> None:
    """Step entropies H_t are set, finite and >= 0 (nats) on every row."""
    row = first_true(entropy.is_null() | ~entropy.is_finite() | (entropy < 0))
    if row is not None:
        raise BadInput(path, f"step entropy {entropy[row]} is not a finite number >= 0 (nats)", column=entropy.name,
                       row=row)
