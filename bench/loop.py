"""A straightforward per-row Python loop of the advantages (GRPO base, EMPG, AEM), the baseline of the advantage case.

Written from docs/method.md alone with dicts keyed by trajectory / group / batch; no polars, no numpy. Default
hyperparameters of AdvantageConfig: k = k' = 1, zeta = 0.1, empg_norm = mean, tau = 1, delta = 0.1, batch = (run, iteration).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

EPS_STD = 1e-6    # docs/method.md: GRPO's std epsilon
EPS_RANGE = 1e-8  # docs/method.md: H_norm's range epsilon; AEM's group is flat within it even at delta = 0


def loop_advantages(rows: Sequence[dict], k: float = 1.0, k_future: float = 1.0, zeta: float = 0.1,
                    tau: float = 1.0, min_range: float = 0.1) -> dict[str, list[float]]:
    """The nine advantage columns for a list of step dicts (run, iteration, group_id, traj_id, step, reward,
    step_entropy), in the rows' order."""
    traj = lambda r: (r["run"], r["iteration"], r["group_id"], r["traj_id"])  # noqa: E731
    # R_i: the trajectory's (equal) non-null reward
    reward: dict[tuple, float] = {}
    for r in rows:
        if r["reward"] is not None:
            reward[traj(r)] = float(r["reward"])
    # A_i: GRPO within the group (docs/method.md)
    members: dict[tuple, list[tuple]] = defaultdict(list)
    for key in reward:
        members[key[:3]].append(key)
    adv: dict[tuple, float] = {}
    for keys in members.values():
        rs = [reward[key] for key in keys]
        n = len(rs)
        if n == 1:
            adv[keys[0]] = rs[0] / (1.0 + EPS_STD)
            continue
        m = sum(rs) / n
        s = math.sqrt(sum((x - m) ** 2 for x in rs) / (n - 1))
        for key in keys:
            adv[key] = (reward[key] - m) / (s + EPS_STD)
    # EMPG (docs/method.md): H_norm, g and A_mod per batch
    batch_h: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        batch_h[(r["run"], r["iteration"])].append(r["step_entropy"])
    lo = {b: min(h) for b, h in batch_h.items()}
    hi = {b: max(h) for b, h in batch_h.items()}
    h_norm = [(r["step_entropy"] - lo[(r["run"], r["iteration"])])
              / (hi[(r["run"], r["iteration"])] - lo[(r["run"], r["iteration"])] + EPS_RANGE) for r in rows]
    scale_sum: dict[tuple, float] = defaultdict(float)
    count: dict[tuple, int] = defaultdict(int)
    next_h: dict[tuple, float] = {}
    for r, hn in zip(rows, h_norm):
        b = (r["run"], r["iteration"])
        scale_sum[b] += math.exp(-k * hn)
        count[b] += 1
        next_h[(traj(r), r["step"])] = hn
    g, f_next, a_mod = [], [], []
    mod_sum: dict[tuple, float] = defaultdict(float)
    for r, hn in zip(rows, h_norm):
        b = (r["run"], r["iteration"])
        gi = math.exp(-k * hn) / (scale_sum[b] / count[b])
        following = next_h.get((traj(r), r["step"] + 1))
        fi = 0.0 if following is None else math.exp(-k_future * following)
        ai = adv[traj(r)] * gi + zeta * fi
        g.append(gi)
        f_next.append(fi)
        a_mod.append(ai)
        mod_sum[b] += ai
    a_empg = [ai - mod_sum[(r["run"], r["iteration"])] / count[(r["run"], r["iteration"])]
              for r, ai in zip(rows, a_mod)]
    # AEM (docs/method.md) per group
    group_u: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        group_u[traj(r)[:3]].append(r["step_entropy"])
    u_lo = {key: min(u) for key, u in group_u.items()}
    u_hi = {key: max(u) for key, u in group_u.items()}
    u_norm, w_scale = [], []
    w_sum: dict[tuple, float] = defaultdict(float)
    for r in rows:
        key = traj(r)[:3]
        spread = u_hi[key] - u_lo[key]
        un = 0.0 if spread < min_range or spread <= EPS_RANGE else (r["step_entropy"] - u_lo[key]) / spread
        u_norm.append(un)
        w_scale.append(math.exp(-un / tau))
        w_sum[key] += w_scale[-1]
    w = []
    for r, sc in zip(rows, w_scale):
        key = traj(r)[:3]
        flat = u_hi[key] - u_lo[key] < min_range or u_hi[key] - u_lo[key] <= EPS_RANGE
        w.append(1.0 if flat else sc / (w_sum[key] / len(group_u[key])))
    base = [adv[traj(r)] for r in rows]
    return {"traj_reward": [reward[traj(r)] for r in rows], "adv_base": base, "empg_h_norm": h_norm, "empg_g": g,
            "empg_f_next": f_next, "adv_empg": a_empg, "aem_u_norm": u_norm, "aem_w": w,
            "adv_aem": [a * wi for a, wi in zip(base, w)]}
