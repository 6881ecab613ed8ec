"""Base advantage, EMPG (arXiv 2509.09265) and AEM (arXiv 2605.00425) as polars expressions (docs/method.md).

Everything is a window over explicit keys, so the result does not depend on row order. Each stage reads only
columns written by earlier stages: polars evaluates a window nested in another window inside the outer
partition, which is both wrong (a batch minimum taken inside a trajectory) and slow.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from .config import EPS_RANGE, EPS_STD, AdvantageConfig
from .schema import TRAJ_KEYS
ADVANTAGE_COLUMNS = ["traj_reward", "adv_base", "empg_h_norm", "empg_g", "empg_f_next", "adv_empg",
                     "aem_u_norm", "aem_w", "adv_aem"]
# integer ids of a step's trajectory, group and batch (one hash of the string keys instead of one per window)
TRAJ, GROUP, BATCH, NEXT = "_traj", "_group", "_batch", "_next"
MIXED_RADIX_LIMIT = 2 ** 62
"""Keys with fewer combined values than this sort as one integer; more fall back to numpy's lexsort."""


def trajectory_reward(reward_agg: str) -> pl.Expr:
    """R_i: the trajectory's non-null rewards, which are equal (`equal`, validated on read) or summed (`sum`)."""
    reward = pl.col("reward").sum() if reward_agg == "sum" else pl.col("reward").max()
    return reward.over(TRAJ).alias("traj_reward")


def base_advantage(estimator: str) -> pl.Expr:
    """A_i over the trajectories of a group (docs/method.md, base advantage), counting each trajectory once (at its step 0).

    With n members, mean m and unbiased std s of R over the group:
    grpo (R - m) / (s + eps), drgrpo R - m, rloo n/(n-1) (R - m), reinforce R; a group of one: R (grpo: R / (1 + eps)).
    """
    r = pl.col("traj_reward")
    first = pl.col("step") == 0
    n = first.sum().over(GROUP)
    m = r.filter(first).mean().over(GROUP)
    s = r.filter(first).std(ddof=1).over(GROUP)
    alone = n == 1
    expr = {
        "grpo": pl.when(alone).then(r / (1.0 + EPS_STD)).otherwise((r - m) / (s + EPS_STD)),
        "drgrpo": pl.when(alone).then(r).otherwise(r - m),
        "rloo": pl.when(alone).then(r).otherwise(n / (n - 1) * (r - m)),
        "reinforce": r,
        "column": pl.col("advantage").max().over(TRAJ),
    }[estimator]
    return expr.cast(pl.Float64).alias("adv_base")


def empg_stages(cfg: AdvantageConfig) -> list[list[pl.Expr]]:
    """EMPG per step, normalised over the batch B (docs/method.md, EMPG); `_next` is the row of step t+1 (-1 at the last)."""
    h = pl.col("step_entropy")
    h_norm = (h - h.min().over(BATCH)) / (h.max().over(BATCH) - h.min().over(BATCH) + EPS_RANGE)
    scale = (-cfg.k * pl.col("empg_h_norm")).exp()
    g = scale / scale.mean().over(BATCH)                      # self-calibrating: mean_B g = 1
    h_norm_next = pl.when(pl.col(NEXT) >= 0).then(pl.col("empg_h_norm").gather(pl.col(NEXT).clip(lower_bound=0)))
    f_next = (-cfg.k_future * h_norm_next).exp().fill_null(0.0)  # 0 at the trajectory's last step
    a_mod = pl.col("adv_base") * pl.col("empg_g") + cfg.zeta * pl.col("empg_f_next")
    a_empg = pl.col("_a_mod") - pl.col("_a_mod").mean().over(BATCH)
    if cfg.empg_norm == "meanstd":
        a_empg = a_empg / (pl.col("_a_mod").std(ddof=1).over(BATCH).fill_null(0.0) + EPS_STD)
    return [[h_norm.alias("empg_h_norm")], [g.alias("empg_g"), f_next.alias("empg_f_next")], [a_mod.alias("_a_mod")],
            [a_empg.alias("adv_empg")]]


def flat_group(spread: pl.Expr, min_range: float | pl.Expr) -> pl.Expr:
    """AEM's flat-group rule: the group's entropy spread max_G u - min_G u is below delta (or within EPS_RANGE of 0,
    so that delta = 0 still keeps an exactly flat group at w = 1 despite round-off)."""
    return (spread < min_range) | (spread <= EPS_RANGE)


def aem_stages(cfg: AdvantageConfig) -> list[list[pl.Expr]]:
    """AEM per response, normalised over the group G (docs/method.md, AEM: our reading of the paper's Sec. 4.2).

    u = H_t (length-normalised response entropy); a flat group (spread below delta = aem_min_range) gets w = 1.
    """
    u = pl.col("step_entropy")
    u_min, u_max = pl.col("_u_min"), pl.col("_u_max")
    flat = flat_group(u_max - u_min, cfg.aem_min_range)
    u_norm = pl.when(flat).then(0.0).otherwise((u - u_min) / (u_max - u_min))
    scale = (-pl.col("aem_u_norm") / cfg.aem_tau).exp()
    w = pl.when(flat).then(1.0).otherwise(scale / scale.mean().over(GROUP))  # mean_G w = 1
    return [[u.min().over(GROUP).alias("_u_min"), u.max().over(GROUP).alias("_u_max")],
            [u_norm.alias("aem_u_norm")], [w.alias("aem_w")], [(pl.col("adv_base") * pl.col("aem_w")).alias("adv_aem")]]


def _codes(steps: pl.DataFrame, columns: list[str]) -> np.ndarray:
    """Each column as its dense rank 0..k-1, (N, len(columns)): equal values, equal codes, order kept.

    Ranks, not value - min: an int64 iteration from INT64_MIN to 0, or a uint64 one up to 2^64 - 1, has a range
    that overflows int64 and would merge or split trajectories in the combined key.
    """
    return steps.select((pl.col(c).rank("dense") - 1).cast(pl.Int64) for c in columns).to_numpy()


def trajectory_structure(steps: pl.DataFrame, batch: list[str]) -> pl.DataFrame:
    """Integer trajectory, group and batch ids and the row of each step's successor, in the frame's row order.

    One argsort by (trajectory keys, step), on a single mixed-radix integer when it fits in 62 bits: sorting
    10M rows by five columns costs ten times more.
    """
    codes = _codes(steps, [*TRAJ_KEYS, "step"])
    spans = codes.max(axis=0) + 1 if len(codes) else np.ones(codes.shape[1], dtype=np.int64)
    if math.prod(int(x) for x in spans) < MIXED_RADIX_LIMIT:
        radix = np.cumprod(np.concatenate([[1], spans[::-1][:-1]]))[::-1]  # weight of each column in the key
        key = codes @ radix
        order = np.argsort(key, kind="stable")
        ranked = key[order]

        def starts(j: int) -> np.ndarray:  # rows that begin a new value of the first j key columns
            prefix = ranked // radix[j - 1]
            return np.concatenate([[True], prefix[1:] != prefix[:-1]])
    else:
        order = np.lexsort(codes.T[::-1])
        ranked = codes[order]

        def starts(j: int) -> np.ndarray:
            return np.concatenate([[True], (ranked[1:, :j] != ranked[:-1, :j]).any(axis=1)])

    def scatter(sorted_values: np.ndarray) -> np.ndarray:  # back to the frame's row order
        out = np.empty_like(sorted_values)
        out[order] = sorted_values
        return out

    new_traj = starts(4)
    columns = {TRAJ: scatter(np.cumsum(new_traj)), GROUP: scatter(np.cumsum(starts(3))),
               NEXT: scatter(np.where(np.append(~new_traj[1:], False), np.append(order[1:], -1), -1))}
    if batch == TRAJ_KEYS[:len(batch)]:  # the default (run, iteration): a prefix of the sort key
        return pl.DataFrame(columns | {BATCH: scatter(np.cumsum(starts(len(batch))))})
    return pl.DataFrame(columns).with_columns(steps.select(pl.struct(batch).rank("dense").alias(BATCH)))


def advantage_table(steps: pl.DataFrame, cfg: AdvantageConfig, structure: pl.DataFrame | None = None) -> pl.DataFrame:
    """ADVANTAGE_COLUMNS for a step frame, in the frame's row order.

    `steps` has the trajectory keys, `step`, `reward`, `step_entropy`, the batch-key columns and, for
    `--estimator column`, `advantage`, validated beforehand (validation.check_keys). `structure` is
    trajectory_structure(steps, batch key) when the caller has it already (validation.checked_steps computes it).
    """
    if structure is None:
        structure = trajectory_structure(steps, list(cfg.batch_key))
    frame = (pl.concat([steps, structure], how="horizontal")
             .with_columns(trajectory_reward(cfg.reward_agg))
             .with_columns(base_advantage(cfg.estimator)))
    for stage in empg_stages(cfg) + aem_stages(cfg):
        frame = frame.with_columns(stage)
    return frame.select(ADVANTAGE_COLUMNS)
