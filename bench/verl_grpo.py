"""empg's in-memory advantages against verl's own GRPO advantage, side by side in one process (`make bench-verl`).

    make bench-verl                                  # builds bench/.venv-verl, runs this, updates bench/RESULTS.md
    bench/.venv-verl/bin/python bench/verl_grpo.py --quick   # small sizes, nothing written

The same 250k trajectories (8 steps each, groups of 8, rewards 0/1) go to:
  empg  `empg.compute_advantages(frame)`: the public library call, checks included, on one row per step (2M rows),
        computing the GRPO base advantage, EMPG and AEM (all nine columns);
  verl  `verl.trainer.ppo.core_algos.compute_grpo_outcome_advantage`, called as verl's trainer calls it
        (ray_trainer.compute_advantage): token-level scores with the outcome reward on each response's last token,
        the response mask, and `uid` strings (one uuid4 per prompt, repeated for its 8 samples) as the index;
        also verl's `compute_grpo_vectorized_outcome_advantage` (its GRPO_VECTORIZED estimator), for reference.
Best of REPEATS after a warm-up, runners interleaved. verl is not a dependency of empg: it lives in the ignored
bench/.venv-verl, which sees the project's own environment (torch, polars) through a .pth file.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

import empg_cli as empg  # noqa: E402

THREADS = 2
REPEATS = 3
RESPONSE_LENGTH = 128   # padded response length of verl's tensors (responses are 16..128 tokens)
TARGET = 5.0            # empg at least 5x faster than verl's compute_grpo_outcome_advantage
SECTION = ("<!-- verl:start -->", "<!-- verl:end -->")


def batch(rng: np.random.Generator, trajectories: int, steps: int, group_size: int):
    """(empg step frame, verl tensors) for the same trajectories: trajectory i is sample i of verl's batch."""
    groups = trajectories // group_size
    reward = rng.integers(0, 2, size=trajectories).astype(np.float64)
    traj = np.repeat(np.arange(trajectories), steps)
    frame = pl.DataFrame({"group_id": (traj // group_size).astype(np.int64), "traj_id": traj.astype(np.int64),
                          "step": np.tile(np.arange(steps), trajectories).astype(np.int64), "reward": reward[traj],
                          "step_entropy": rng.uniform(0.05, 3.0, size=trajectories * steps)})
    frame = frame.with_columns(pl.col("group_id", "traj_id").cast(pl.String))
    lengths = torch.from_numpy(rng.integers(16, RESPONSE_LENGTH + 1, size=trajectories))
    response_mask = (torch.arange(RESPONSE_LENGTH)[None, :] < lengths[:, None]).float()   # (B, L)
    token_level_rewards = torch.zeros(trajectories, RESPONSE_LENGTH)                       # (B, L)
    token_level_rewards[torch.arange(trajectories), lengths - 1] = torch.from_numpy(reward).float()
    uids = np.array([str(uuid.uuid4()) for _ in range(groups)], dtype=object)
    index = np.repeat(uids, group_size)                       # verl: batch.repeat(n, interleave=True)
    return frame, {"token_level_rewards": token_level_rewards, "response_mask": response_mask, "index": index}


def best_of(runners: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, object]]:
    """Best wall time of each runner, interleaved round robin after one warm-up each."""
    for fn in runners.values():
        fn()
    best: dict[str, tuple[float, object]] = {}
    for _ in range(repeats):
        for name, fn in runners.items():
            start = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - start
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, out)
            print(f"  {name}: {seconds:.3f} s", flush=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="25k trajectories, nothing written")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    from verl.trainer.ppo.core_algos import (compute_grpo_outcome_advantage,
                                             compute_grpo_vectorized_outcome_advantage)
    import verl

    trajectories, steps, group_size = (25_000 if args.quick else 250_000), 8, 8
    frame, tensors = batch(np.random.default_rng(11), trajectories, steps, group_size)
    print(f"{trajectories:,} trajectories x {steps} steps, groups of {group_size}: {frame.height:,} step rows",
          flush=True)
    best = best_of({"empg.compute_advantages": lambda: empg.compute_advantages(frame),
                    "verl compute_grpo_outcome_advantage": lambda: compute_grpo_outcome_advantage(**tensors),
                    "verl compute_grpo_vectorized_outcome_advantage":
                        lambda: compute_grpo_vectorized_outcome_advantage(**tensors)}, REPEATS)

    empg_s, scored = best["empg.compute_advantages"]
    loop_s, (verl_adv, _) = best["verl compute_grpo_outcome_advantage"]
    vec_s, (vec_adv, _) = best["verl compute_grpo_vectorized_outcome_advantage"]
    last = tensors["response_mask"].sum(dim=1).long() - 1
    ours = scored.filter(pl.col("step") == 0)["adv_base"].to_numpy()   # rows of trajectory i are i*8..i*8+7
    rows = np.arange(trajectories)
    diff_loop = float(np.max(np.abs(verl_adv[rows, last].double().numpy() - ours)))
    diff_vec = float(np.max(np.abs(vec_adv[rows, last].double().numpy() - ours)))
    ratio = loop_s / empg_s
    table = "\n".join([
        "| runner | work | seconds | ratio | target | result |",
        "|---|---|---|---|---|---|",
        f"| empg `empg.compute_advantages(frame)` | {frame.height:,} step rows: checks, GRPO base, EMPG and AEM "
        f"(9 columns) | {empg_s:.3f} | | | |",
        f"| verl `compute_grpo_outcome_advantage` | {trajectories:,} responses x {RESPONSE_LENGTH} tokens: GRPO "
        f"only | {loop_s:.3f} | empg {ratio:.2f}x faster | >= {TARGET:.0f}x | {'PASS' if ratio >= TARGET else 'FAIL'} |",
        f"| verl `compute_grpo_vectorized_outcome_advantage` | the same, vectorised | {vec_s:.3f} | "
        f"empg {vec_s / empg_s:.2f}x its speed | | |",
        f"| max \\|verl − empg\\| GRPO advantage per trajectory (float32 vs float64) | loop / vectorised | | "
        f"{diff_loop:.1e} / {diff_vec:.1e} | <= 1e-5 | {'PASS' if max(diff_loop, diff_vec) <= 1e-5 else 'FAIL'} |",
    ])
    print()
    print(table)
    if args.quick:
        return
    section = "\n".join([
        SECTION[0],
        "## In-memory advantages vs verl's GRPO advantage (`make bench-verl`)",
        "",
        f"Written by `bench/verl_grpo.py` on the machine above with verl {verl.__version__} (`pip install --no-deps`, "
        f"in the ignored bench/.venv-verl), torch {torch.__version__}, polars {pl.__version__}, {THREADS} threads; "
        f"best of {REPEATS} after a warm-up, runners interleaved; load average {os.getloadavg()[0]:.2f} at the end.",
        f"The same {trajectories:,} trajectories of {steps} steps in groups of {group_size} (rewards 0/1): empg "
        "gets one row per step, as a polars frame in memory; verl gets them as its trainer does, token-level "
        "scores with the reward on each response's last token, the response mask and the `uid` index.",
        "",
        table,
        "",
        "verl's `compute_grpo_outcome_advantage` loops over the batch in Python; its vectorised variant is listed "
        "for a fair picture (empg computes EMPG and AEM on top of GRPO, over 8x as many rows, with its input checks).",
        SECTION[1],
    ])
    results = BENCH / "RESULTS.md"
    text = results.read_text()
    pattern = re.compile(re.escape(SECTION[0]) + ".*?" + re.escape(SECTION[1]), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    results.write_text(text.rstrip("\n") + "\n")
    print(f"\nwrote the verl section of {results}")


if __name__ == "__main__":
    main()
