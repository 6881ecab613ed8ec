"""Base advantage (SPEC 3.1), EMPG (3.2, arXiv 2509.09265) and AEM (3.3, arXiv 2605.00425) as polars expressions.

Everything is a window over explicit keys, so the result does not depend on row order.
"""

from __future__ import annotations

import polars as pl

from .config import EPS_RANGE, EPS_STD, AdvantageConfig

TRAJ_KEYS = ["run", "iteration", "group_id", "traj_id"]
GROUP_KEYS = ["run", "iteration", "group_id"]
ADVANTAGE_COLUMNS = ["traj_reward", "adv_base", "empg_h_norm", "empg_g", "empg_f_next", "adv_empg",
                     "aem_u_norm", "aem_w", "adv_aem"]


def trajectory_reward(reward_agg: str) -> pl.Expr:
    """R_i: the trajectory's non-null rewards, which are equal (`equal`, validated on read) or summed (`sum`)."""
    reward = pl.col("reward").sum() if reward_agg == "sum" else pl.col("reward").max()
    return reward.over(TRAJ_KEYS).alias("traj_reward")


def base_advantage(estimator: str) -> pl.Expr:
    """A_i over the trajectories of a group, on a frame with one row per trajectory (SPEC 3.1).

    With n members, mean m and unbiased std s of R over the group:
    grpo (R - m) / (s + eps), drgrpo R - m, rloo n/(n-1) (R - m), reinforce R; a group of one: R (grpo: R / (1 + eps)).
    """
    r = pl.col("traj_reward")
    n = pl.len().over(GROUP_KEYS)
    m = r.mean().over(GROUP_KEYS)
    s = r.std(ddof=1).over(GROUP_KEYS)
    alone = n == 1
    expr = {
        "grpo": pl.when(alone).then(r / (1.0 + EPS_STD)).otherwise((r - m) / (s + EPS_STD)),
        "drgrpo": pl.when(alone).then(r).otherwise(r - m),
        "rloo": pl.when(alone).then(r).otherwise(n / (n - 1) * (r - m)),
        "reinforce": r,
        "column": pl.col("advantage"),
    }[estimator]
    return expr.cast(pl.Float64).alias("adv_base")


def empg_stages(cfg: AdvantageConfig) -> list[list[pl.Expr]]:
    """EMPG per step, normalised over the batch B (SPEC 3.2), in stages applied one after another.

    Each stage only reads columns of earlier stages: a window nested in another window is evaluated
    inside the outer partition (the batch min/max inside a trajectory, a trajectory shift inside a batch).
    """
    batch = list(cfg.batch_key)
    h = pl.col("step_entropy")
    h_min, h_max = h.min().over(batch), h.max().over(batch)
    h_norm = (h - h_min) / (h_max - h_min + EPS_RANGE)
    scale = (-cfg.k * pl.col("empg_h_norm")).exp()
    g = scale / scale.mean().over(batch)                      # self-calibrating: mean_B g = 1
    h_norm_next = pl.col("empg_h_norm").shift(-1).over(TRAJ_KEYS, order_by="step")
    f_next = (-cfg.k_future * h_norm_next).exp().fill_null(0.0)  # 0 at the trajectory's last step
    a_mod = pl.col("adv_base") * pl.col("empg_g") + cfg.zeta * pl.col("empg_f_next")
    a_empg = a_mod - a_mod.mean().over(batch)
    if cfg.empg_norm == "meanstd":
        a_empg = a_empg / (a_mod.std(ddof=1).over(batch).fill_null(0.0) + EPS_STD)
    return [[h_norm.alias("empg_h_norm")], [g.alias("empg_g"), f_next.alias("empg_f_next")],
            [a_empg.alias("adv_empg")]]


def aem_columns(cfg: AdvantageConfig) -> list[pl.Expr]:
    """AEM per response, normalised over the group G (SPEC 3.3, our reading of the AEM paper's Sec. 4.2).

    u = H_t (length-normalised response entropy); a flat group (max - min <= eps) gets w = 1.
    """
    u = pl.col("step_entropy")
    u_min, u_max = u.min().over(GROUP_KEYS), u.max().over(GROUP_KEYS)
    flat = (u_max - u_min) <= EPS_RANGE
    u_norm = pl.when(flat).then(0.0).otherwise((u - u_min) / (u_max - u_min))
    scale = (-u_norm / cfg.aem_tau).exp()
    w = pl.when(flat).then(1.0).otherwise(scale / scale.mean().over(GROUP_KEYS))  # mean_G w = 1
    return [u_norm.alias("aem_u_norm"), w.alias("aem_w"), (pl.col("adv_base") * w).alias("adv_aem")]


def compute_advantages(steps: pl.DataFrame, cfg: AdvantageConfig) -> pl.DataFrame:
    """ADVANTAGE_COLUMNS for a step frame, in the frame's row order.

    `steps` has the trajectory keys, `step`, `reward`, `step_entropy`, the batch-key columns and, for
    `--estimator column`, `advantage`; rewards are validated (rollouts.read_rollouts) beforehand.
    """
    frame = steps.with_columns(trajectory_reward(cfg.reward_agg))
    per_traj = (frame.group_by(TRAJ_KEYS)
                .agg(pl.col("traj_reward").first(),
                     *([pl.col("advantage").drop_nulls().first()] if cfg.estimator == "column" else []))
                .with_columns(base_advantage(cfg.estimator))
                .select(*TRAJ_KEYS, "adv_base"))
    frame = frame.join(per_traj, on=TRAJ_KEYS, how="left", maintain_order="left")
    for stage in empg_stages(cfg):
        frame = frame.with_columns(stage)
    frame = frame.with_columns(aem_columns(cfg))
    return frame.select(ADVANTAGE_COLUMNS)
