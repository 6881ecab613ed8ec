"""Slow, obvious float64 references for every formula of docs/method.md, written from that document alone.

Deliberately independent of empg_cli: plain Python loops over dicts of trajectories, groups and
batches, `math.fsum` for sums, numpy only to hold one vocabulary row at a time. No polars and no
production code path, so a shared mistake is unlikely. The epsilons are re-typed from docs/method.md on
purpose instead of imported from empg_cli.config (a wrong constant there must show up here).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch

EPS_STD = 1e-6     # GRPO's (R - m) / (s + 1e-6); the meanstd divisor of EMPG
EPS_RANGE = 1e-8   # H_norm's range epsilon; AEM's group is flat within it even at delta = 0


# ---------------------------------------------------------------------------------------------
# Per-token statistics (docs/method.md), one vocabulary row at a time, in float64.
# ---------------------------------------------------------------------------------------------

def softmax_row(logits_row: Sequence[float], temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(p, log p) of softmax(z / T) for one row, in float64, max-shifted so nothing overflows."""
    z = np.asarray(logits_row, dtype=np.float64) / temperature           # (V,)
    shifted = z - z.max()
    log_partition = math.log(math.fsum(math.exp(x) for x in shifted))
    log_p = shifted - log_partition                                       # (V,)
    return np.exp(log_p), log_p


def entropy_ref(logits_row: Sequence[float], temperature: float) -> float:
    """H = -sum_v p_v log p_v (nats); a p_v that underflows to 0 contributes 0."""
    p, log_p = softmax_row(logits_row, temperature)
    return -math.fsum(float(pv) * float(lv) for pv, lv in zip(p, log_p) if pv > 0.0)


def sum_p2_ref(logits_row: Sequence[float], temperature: float) -> float:
    """C = sum_v p_v^2."""
    p, _ = softmax_row(logits_row, temperature)
    return math.fsum(float(pv) * float(pv) for pv in p)


def logprob_ref(logits_row: Sequence[float], target: int, temperature: float) -> float:
    """log p_a of the sampled token a."""
    _, log_p = softmax_row(logits_row, temperature)
    return float(log_p[target])


def renyi2_ref(logits_row: Sequence[float], temperature: float) -> float:
    """H2 = -log sum_v p_v^2 (nats)."""
    return -math.log(sum_p2_ref(logits_row, temperature))


def grad_norm_sq_explicit_ref(logits_row: Sequence[float], target: int, temperature: float) -> float:
    """||grad_u log softmax(u)_a||^2 at u = z / T, from the explicit gradient vector onehot(a) - p."""
    p, _ = softmax_row(logits_row, temperature)
    grad = -p.copy()
    grad[target] += 1.0                                                   # (V,)
    return math.fsum(float(x) * float(x) for x in grad)


def grad_norm_sq_autograd_ref(logits_row: Sequence[float], target: int, temperature: float) -> float:
    """The same squared norm by float64 autograd of log_softmax(u)[a] with respect to u = z / T."""
    u = (torch.tensor(np.asarray(logits_row, dtype=np.float64)) / temperature).detach().requires_grad_(True)
    torch.log_softmax(u, dim=-1)[target].backward()
    return float((u.grad.double() ** 2).sum())


def grad_norm_sq_expected_ref(logits_row: Sequence[float], temperature: float) -> float:
    """E_{a~p} ||grad log pi(a)||^2 as the literal expectation sum_a p_a ||onehot(a) - p||^2."""
    p, _ = softmax_row(logits_row, temperature)
    return math.fsum(float(p[a]) * grad_norm_sq_explicit_ref(logits_row, a, temperature) for a in range(len(p)))


def token_stats_ref(logits: Any, targets: Any, temperature: float) -> dict[str, list[float]]:
    """Every per-token statistic for a (N, V) array of logits, as float64 lists of length N."""
    rows = np.asarray(logits, dtype=np.float64)
    out: dict[str, list[float]] = defaultdict(list)
    for row, a in zip(rows, np.asarray(targets).tolist()):
        p, log_p = softmax_row(row, temperature)   # one softmax per row; the same formulas as above
        c = math.fsum(float(pv) * float(pv) for pv in p)
        grad = -p.copy()
        grad[int(a)] += 1.0                                              # onehot(a) - p, (V,)
        out["entropy"].append(-math.fsum(float(pv) * float(lv) for pv, lv in zip(p, log_p) if pv > 0.0))
        out["sum_p2"].append(c)
        out["logprob"].append(float(log_p[int(a)]))
        out["renyi2"].append(-math.log(c))
        out["grad_norm_sq"].append(math.fsum(float(x) * float(x) for x in grad))
        out["grad_norm_sq_expected"].append(1.0 - c)
    return dict(out)


# ---------------------------------------------------------------------------------------------
# Advantages (docs/method.md) over a list of row dicts; results come back in the rows' order.
# ---------------------------------------------------------------------------------------------

def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _unbiased_std(values: Sequence[float]) -> float:
    m = _mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def trajectory_rewards(rows: Sequence[dict], reward_agg: str) -> dict[tuple, float]:
    """R_i per trajectory key (run, iteration, group_id, traj_id)."""
    rewards: dict[tuple, list[float]] = {}
    for r in rows:
        values = rewards.setdefault((r["run"], r["iteration"], r["group_id"], r["traj_id"]), [])
        if r["reward"] is not None:
            values.append(float(r["reward"]))
    out = {}
    for key, values in rewards.items():
        if reward_agg == "sum":
            out[key] = math.fsum(values)
        else:
            if len(set(values)) != 1:
                raise ValueError(f"trajectory {key}: rewards {values} are not all equal")
            out[key] = values[0]
    return out


def base_advantages(rows: Sequence[dict], estimator: str, reward_agg: str) -> dict[tuple, float]:
    """A_i per trajectory key, looping over groups."""
    r_of = trajectory_rewards(rows, reward_agg)
    groups: dict[tuple, list[tuple]] = defaultdict(list)
    for key in r_of:
        groups[key[:3]].append(key)
    column: dict[tuple, float] = {}
    if estimator == "column":
        for r in rows:
            key = (r["run"], r["iteration"], r["group_id"], r["traj_id"])
            if r.get("advantage") is not None:
                if key in column and column[key] != r["advantage"]:
                    raise ValueError(f"trajectory {key}: advantage differs between steps")
                column[key] = float(r["advantage"])
    adv: dict[tuple, float] = {}
    for members in groups.values():
        rs = [r_of[key] for key in members]
        n = len(rs)
        for key in members:
            big_r = r_of[key]
            if estimator == "reinforce":
                adv[key] = big_r
            elif estimator == "column":
                adv[key] = column[key]
            elif n == 1:
                # grpo uses m = 0, s = 1; drgrpo and rloo give R_i.
                adv[key] = (big_r - 0.0) / (1.0 + EPS_STD) if estimator == "grpo" else big_r
            else:
                m = _mean(rs)
                if estimator == "grpo":
                    adv[key] = (big_r - m) / (_unbiased_std(rs) + EPS_STD)
                elif estimator == "drgrpo":
                    adv[key] = big_r - m
                elif estimator == "rloo":
                    adv[key] = n / (n - 1) * (big_r - m)
                else:
                    raise ValueError(f"unknown estimator {estimator}")
    return adv


def advantages_ref(rows: Sequence[dict], *, estimator: str = "grpo", reward_agg: str = "equal", k: float = 1.0,
                   k_future: float = 1.0, zeta: float = 0.1, empg_norm: str = "mean", aem_tau: float = 1.0,
                   aem_min_range: float = 0.1, batch_key: Sequence[str] = ("run", "iteration")) -> list[dict[str, float]]:
    """All advantage columns of the scored table for each row, in the rows' order (one dict per row)."""
    n_rows = len(rows)
    traj_key = [(r["run"], r["iteration"], r["group_id"], r["traj_id"]) for r in rows]
    group_key = [key[:3] for key in traj_key]
    batch_of = [tuple(r[c] for c in batch_key) for r in rows]
    r_of = trajectory_rewards(rows, reward_agg)
    a_of = base_advantages(rows, estimator, reward_agg)
    h = [float(r["step_entropy"]) for r in rows]

    batches: dict[tuple, list[int]] = defaultdict(list)
    groups: dict[tuple, list[int]] = defaultdict(list)
    row_at_step: dict[tuple, int] = {}
    for i in range(n_rows):
        batches[batch_of[i]].append(i)
        groups[group_key[i]].append(i)
        row_at_step[(traj_key[i], int(rows[i]["step"]))] = i

    # EMPG: H_norm and g per batch.
    h_norm = [0.0] * n_rows
    g = [0.0] * n_rows
    for members in batches.values():
        lo, hi = min(h[i] for i in members), max(h[i] for i in members)
        for i in members:
            h_norm[i] = (h[i] - lo) / (hi - lo + EPS_RANGE)
        mean_scale = _mean([math.exp(-k * h_norm[i]) for i in members])
        for i in members:
            g[i] = math.exp(-k * h_norm[i]) / mean_scale

    # f_next: the batch-normalised entropy of step t+1 of the same trajectory, else 0.
    f_next = [0.0] * n_rows
    for i in range(n_rows):
        nxt = row_at_step.get((traj_key[i], int(rows[i]["step"]) + 1))
        f_next[i] = math.exp(-k_future * h_norm[nxt]) if nxt is not None else 0.0

    a_mod = [a_of[traj_key[i]] * g[i] + zeta * f_next[i] for i in range(n_rows)]
    a_empg = [0.0] * n_rows
    for members in batches.values():
        values = [a_mod[i] for i in members]
        m = _mean(values)
        s = _unbiased_std(values) if len(values) > 1 else 0.0
        for i in members:
            a_empg[i] = a_mod[i] - m
            if empg_norm == "meanstd":
                a_empg[i] /= s + EPS_STD

    # AEM per group G (all responses of all its trajectories).
    u_norm = [0.0] * n_rows
    w = [1.0] * n_rows
    for members in groups.values():
        lo, hi = min(h[i] for i in members), max(h[i] for i in members)
        if hi - lo < aem_min_range or hi - lo <= EPS_RANGE:
            continue  # flat group (spread below delta, or zero at delta = 0): w = 1, u_norm left at 0
        for i in members:
            u_norm[i] = (h[i] - lo) / (hi - lo)
        mean_scale = _mean([math.exp(-u_norm[i] / aem_tau) for i in members])
        for i in members:
            w[i] = math.exp(-u_norm[i] / aem_tau) / mean_scale

    return [{"traj_reward": r_of[traj_key[i]], "adv_base": a_of[traj_key[i]], "empg_h_norm": h_norm[i],
             "empg_g": g[i], "empg_f_next": f_next[i], "adv_empg": a_empg[i], "aem_u_norm": u_norm[i],
             "aem_w": w[i], "adv_aem": a_of[traj_key[i]] * w[i]} for i in range(n_rows)]


def prime_steps_ref(episodes: Sequence[dict]) -> list[dict]:
    """prime-rl traces walked node by node: each sampled node with masked-in tokens is a step of its trace, its
    prompt every id on its root-to-node path before its first masked-in token, its response the masked-in run."""
    steps = []
    for episode in episodes:
        for t, trace in enumerate(episode["traces"]):
            if (trace.get("agent") or {}).get("trainable") is False:
                continue
            nodes = trace["nodes"]

            def path(i: int) -> list[int]:
                parent = nodes[i]["parent"]
                return (path(parent) if parent is not None else []) + list(nodes[i]["token_ids"])

            index = 0
            for i, node in enumerate(nodes):
                mask = node.get("mask") or [bool(node.get("sampled"))] * len(node["token_ids"])
                marked = [j for j, m in enumerate(mask) if m]
                if not node.get("sampled") or not marked:
                    continue
                own = len(path(i)) - len(node["token_ids"])
                steps.append({"traj_id": f"{episode['id']}/{t}", "step": index,
                              "prompt_ids": path(i)[:own + marked[0]],
                              "response_ids": list(node["token_ids"][marked[0]:marked[-1] + 1]),
                              "logprobs": node.get("logprobs") or None})
                index += 1
    return steps
