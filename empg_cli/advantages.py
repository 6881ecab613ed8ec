"""Base advantage, EMPG (arXiv 2509.09265) and AEM (arXiv 2605.00425) as polars expressions (docs/method.md).

Everything is a window over explicit keys, so the result does not depend on row order; the windows run over
integer ids on the rows in key order, where each trajectory, group and batch is one block of rows. Each stage reads
only columns written by earlier stages: polars evaluates a window nested in another window inside the outer
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
# integer ids of a step's trajectory, group and batch (numbered along key order) and the row of its successor
TRAJ, GROUP, BATCH, NEXT = "_traj", "_group", "_batch", "_next"
KEY_ORDER = "_key_order"
"""The frame's row at each position of key order (trajectory keys, then step)."""
MIXED_RADIX_LIMIT = 2 ** 62
"""Keys with fewer combined values than this sort as one integer; more fall back to numpy's lexsort."""


def trajectory_reward(reward_agg: str, has_nulls: bool = True) -> pl.Expr:
    """R_i: the trajectory's non-null rewards, which are equal (`equal`, validated on read) or summed (`sum`).

    Equal rewards set on every step are R_i already, with no window."""
    if reward_agg == "equal" and not has_nulls:
        return pl.col("reward").cast(pl.Float64).alias("traj_reward")
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
    """EMPG per step, normalised over the batch B (docs/method.md, EMPG), on rows in key order: step t+1 is the next
    row where `_next` >= 0 (-1 at a trajectory's last step)."""
    h = pl.col("step_entropy")
    h_norm = (h - h.min().over(BATCH)) / (h.max().over(BATCH) - h.min().over(BATCH) + EPS_RANGE)
    scale = (-cfg.k * pl.col("empg_h_norm")).exp()
    g = scale / scale.mean().over(BATCH)                      # self-calibrating: mean_B g = 1
    h_norm_next = pl.when(pl.col(NEXT) >= 0).then(pl.col("empg_h_norm").shift(-1))
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


def _codes(column: pl.Series) -> np.ndarray:
    """A key column as int64 codes 0..k-1: equal values, equal codes.

    Integers keep their order (step orders a trajectory): value - min when the span is small, else the dense rank
    (an int64 from INT64_MIN to 0, or a uint64 up to 2^64 - 1, has a range that overflows int64). Text needs only
    equality, so no string is ever sorted: _text_codes.
    """
    if column.dtype == pl.String:
        codes = _text_codes(column)
    else:
        low, high = column.min(), column.max()
        codes = column - low if int(high) - int(low) < 2 ** 32 else column.rank("dense") - 1
    return codes.cast(pl.Int64).to_numpy()


def _text_codes(column: pl.Series) -> pl.Series:
    """Codes of a text column by first appearance: the index of its run of equal values when no value has two
    runs (ids logged block by block: one linear pass), else categorical codes of a fresh category set (a hash
    table; the global one would keep every id of the process alive)."""
    runs = column.rle_id()
    if runs[-1] < len(column) // 2:  # blocks: worth checking that each value has a single run
        index = runs.to_numpy()
        firsts = column.filter(pl.Series(np.concatenate([[True], index[1:] != index[:-1]])))
        if firsts.n_unique() == len(firsts):
            return runs
    return column.cast(pl.Categorical(pl.Categories.random())).to_physical()


def batch_is_key_prefix(batch: list[str]) -> bool:
    """Whether the batch key leads the trajectory keys (the default, run and iteration): then each batch is one
    block of key order, and its ids are numbered along it."""
    return batch == TRAJ_KEYS[:len(batch)]


def trajectory_structure(steps: pl.DataFrame, batch: list[str]) -> pl.DataFrame:
    """Integer trajectory, group and batch ids and the row of each step's successor, in the frame's row order, and
    the frame's rows in key order (`_key_order`: trajectory keys, then step).

    Key order comes from one argsort of a single mixed-radix integer when it fits in 62 bits (sorting 10M rows by
    five columns costs ten times more), or from none when the frame is in key order already: text codes count by
    first appearance and integers by value, so a file logged trajectory by trajectory, iterations ascending, is.
    Ids number the blocks of key order, so they increase down the rows of key order.
    """
    n = steps.height
    if n == 0:
        return pl.DataFrame(schema={c: pl.Int64 for c in (TRAJ, GROUP, NEXT, BATCH, KEY_ORDER)})
    codes = [_codes(steps[c]) for c in [*TRAJ_KEYS, "step"]]
    spans = [int(c.max()) + 1 for c in codes]
    if math.prod(spans) < MIXED_RADIX_LIMIT:
        prefixes = [codes[0]]  # key of the first j columns, j = 1..5
        for code, span in zip(codes[1:], spans[1:]):
            prefixes.append(prefixes[-1] * span + code)
        key = prefixes[-1]
        order = np.arange(n) if (key[1:] >= key[:-1]).all() else pl.Series(key).arg_sort().cast(pl.Int64).to_numpy()

        def starts(j: int) -> np.ndarray:  # rows, in key order, that begin a new value of the first j key columns
            prefix = prefixes[j - 1][order]
            return np.concatenate([[True], prefix[1:] != prefix[:-1]])
    else:
        ranked = np.column_stack(codes)
        order = np.lexsort(ranked.T[::-1])
        ranked = ranked[order]

        def starts(j: int) -> np.ndarray:
            return np.concatenate([[True], (ranked[1:, :j] != ranked[:-1, :j]).any(axis=1)])

    def in_row_order(values: np.ndarray) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        out[order] = values
        return out

    new_traj = starts(4)
    columns = {TRAJ: in_row_order(np.cumsum(new_traj) - 1), GROUP: in_row_order(np.cumsum(starts(3)) - 1),
               NEXT: in_row_order(np.where(np.append(~new_traj[1:], False), np.append(order[1:], -1), -1)),
               KEY_ORDER: order}
    if batch_is_key_prefix(batch):
        return pl.DataFrame(columns | {BATCH: in_row_order(np.cumsum(starts(len(batch))) - 1)})
    return pl.DataFrame(columns).with_columns(steps.select(pl.struct(batch).rank("dense").alias(BATCH)))


def advantage_table(steps: pl.DataFrame, cfg: AdvantageConfig, structure: pl.DataFrame | None = None) -> pl.DataFrame:
    """ADVANTAGE_COLUMNS for a step frame, in the frame's row order.

    `steps` has the trajectory keys, `step`, `reward`, `step_entropy`, the batch-key columns and, for
    `--estimator column`, `advantage`, validated beforehand (validation.check_keys). `structure` is
    trajectory_structure(steps, batch key) when the caller has it already (validation.checked_steps computes it).
    The stages run on the rows in key order, where the ids carry polars' sorted flag: a window over a sorted key
    takes slices instead of hashing, and a step's successor is the next row.
    """
    if structure is None:
        structure = trajectory_structure(steps, list(cfg.batch_key))
    order = structure[KEY_ORDER].to_numpy()
    shuffled = not np.array_equal(order, np.arange(len(order)))
    used = [c for c in ("step", "reward", "step_entropy", "advantage") if c in steps.columns]
    frame = pl.concat([steps.select(used), structure.drop(KEY_ORDER)], how="horizontal")
    if shuffled:
        frame = frame[order]
    contiguous = [TRAJ, GROUP, *([BATCH] if batch_is_key_prefix(list(cfg.batch_key)) else [])]
    frame = (frame.with_columns(pl.col(c).set_sorted() for c in contiguous)
             .with_columns(trajectory_reward(cfg.reward_agg, steps["reward"].null_count() > 0))
             .with_columns(base_advantage(cfg.estimator)))
    for stage in empg_stages(cfg) + aem_stages(cfg):
        frame = frame.with_columns(stage)
    table = frame.select(ADVANTAGE_COLUMNS)
    if not shuffled:
        return table
    row_order = np.empty_like(order)
    row_order[order] = np.arange(len(order))
    return table[row_order]
