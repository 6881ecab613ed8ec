"""A minimal reference trainer that takes its advantages from empg: sample, `empg score`, policy-gradient step.

Why it exists: empg promises a scored Parquet that a separate trainer can consume. This loop is that
trainer, kept small: per iteration it samples `group_size` trajectories for each of `groups` tasks
with the current policy (logging ids, text, rewards and each token's entropy at generation time),
saves the policy as `checkpoints/iter_<i>`, runs `empg score` on the rollouts exactly as a user
would (a subprocess), and takes a clipped policy-gradient step (PPO/GRPO surrogate, Schulman et al.
2017) with the chosen step advantage column (`adv_empg`, `adv_aem` or `adv_base`) broadcast to the
step's response tokens and empg's `token_logprob` as the behaviour log-probabilities.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from household import ACTION, Household, Task
from policy import Turns, pad_right, sample_replies, save_checkpoint, token_logprobs

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
ROLLOUT_SCHEMA = pa.schema([
    ("run", pa.string()), ("iteration", pa.int64()), ("group_id", pa.string()), ("traj_id", pa.string()),
    ("step", pa.int64()), ("messages", pa.list_(MESSAGE)), ("prompt", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())), ("response", pa.string()), ("response_ids", pa.list_(pa.int32())),
    ("reward", pa.float64()), ("token_entropy", pa.list_(pa.float32())),
    ("task", pa.string()), ("action", pa.string()), ("observation", pa.string()), ("success", pa.bool_()),
])


@dataclass(frozen=True)
class RLConfig:
    """How the reference trainer samples and updates."""

    run: str = "household"
    """Value of the `run` column."""
    iterations: int = 6
    """Policy versions that sample rollouts; the policy is updated after each but the last."""
    groups: int = 24
    """Tasks in the training set, each one GRPO group per iteration."""
    group_size: int = 6
    """Trajectories sampled per task."""
    max_new_tokens: int = 32
    """Longest reply; a reply that has not emitted <|im_end|> by then is cut and its turn closed."""
    advantage: str = "adv_empg"
    """empg column used as the advantage: adv_empg, adv_aem or adv_base."""
    lr: float = 2e-4
    """AdamW learning rate of the policy-gradient step."""
    epochs: int = 4
    """Passes over one iteration's rollouts per update."""
    minibatch: int = 16
    """Trajectories per gradient step."""
    clip: float = 0.2
    """PPO ratio clip epsilon."""


def collect(model: LlamaForCausalLM, turns: Turns, tasks: Sequence[Task], cfg: RLConfig, iteration: int,
            generator: torch.Generator) -> pa.Table:
    """Play `group_size` episodes of every task in lockstep, one batched reply per turn; one row per step."""
    envs = [Household(task) for task in tasks for _ in range(cfg.group_size)]
    prompts = [turns.first(env.first_observation()) for env in envs]
    messages = [[{"role": "user", "content": env.first_observation()}] for env in envs]
    rows: list[dict[str, Any]] = []
    active = list(range(len(envs)))
    while active:
        replies = sample_replies(model, [prompts[i] for i in active], max_new_tokens=cfg.max_new_tokens,
                                 end_id=turns.end_id, pad_id=turns.pad_id, generator=generator)
        for i, (ids, entropies) in zip(active, replies):
            env, content = envs[i], turns.reply_content(ids)
            observation = env.step(content)
            action = ACTION.search(content.strip())
            rows.append({
                "run": cfg.run, "iteration": iteration, "group_id": env.task.task_id,
                "traj_id": f"{env.task.task_id}/{i % cfg.group_size}", "step": env.steps - 1,
                "messages": list(messages[i]), "prompt": turns.text(prompts[i]), "prompt_ids": prompts[i],
                "response": turns.text(ids), "response_ids": ids, "token_entropy": entropies,
                "task": env.task.goal, "action": action.group(1).strip() if action else None,
                "observation": observation, "env": i,
            })
            messages[i] += [{"role": "assistant", "content": content}, {"role": "user", "content": observation}]
            closed = [] if ids[-1] == turns.end_id else [turns.end_id]  # the template closes a cut-off turn
            prompts[i] = prompts[i] + ids + closed + turns.next(observation)
        active = [i for i in active if not envs[i].done]
    rows.sort(key=lambda row: (row["env"], row["step"]))  # trajectory by trajectory, steps in order
    for row in rows:
        env = envs[row.pop("env")]
        row["reward"], row["success"] = float(env.success), env.success
    return pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)


def empg_score(rollouts: Path, checkpoint: Path, out: Path) -> pl.DataFrame:
    """Run `empg score` on one iteration's rollouts as a user would, and read the scored table.

    One CPU thread keeps the rescored numbers, and so the whole regeneration, bit-for-bit reproducible.
    """
    empg = Path(sys.executable).with_name("empg")
    command = [str(empg), "score", str(rollouts), "--model", str(checkpoint), "-o", str(out), "--overwrite",
               "--device", "cpu", "--token-level"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return pl.read_parquet(out)


class TrajectoryTokens(NamedTuple):
    """A trajectory as one sequence (its last prompt + last response: the prefix chain), with per token
    whether it is a response token, its step's advantage and empg's log-prob of it under the sampler."""

    ids: list[int]
    is_response: np.ndarray
    advantage: np.ndarray
    old_logprob: np.ndarray


def trajectory_tokens(traj: pl.DataFrame, advantage: str) -> TrajectoryTokens:
    """Lay a scored trajectory's step rows (in step order) onto its full token sequence."""
    last = traj.row(traj.height - 1, named=True)
    ids = list(last["prompt_ids"]) + list(last["response_ids"])
    out = TrajectoryTokens(ids, np.zeros(len(ids), bool), np.zeros(len(ids)), np.zeros(len(ids)))
    steps = traj.select("prompt_ids", "response_ids", advantage, "token_logprob")
    for prompt, response, a, logprob in steps.iter_rows():
        span = slice(len(prompt), len(prompt) + len(response))
        out.is_response[span], out.advantage[span], out.old_logprob[span] = True, a, logprob
    return out


def policy_gradient_update(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, scored: pl.DataFrame,
                           cfg: RLConfig, rng: np.random.Generator, pad_id: int) -> dict[str, float]:
    """Clipped surrogate -min(r A, clip(r, 1 +- eps) A), r = pi / pi_old, averaged over each trajectory's
    response tokens and then over trajectories (GRPO's sequence mean: long failed episodes do not
    outweigh short successes, which a plain token mean lets them do).

    Returns how far the first minibatch's ratio is from 1 (0 up to float error: empg's token_logprob is
    the sampler's own log-prob) and the fraction of clipped tokens.
    """
    trajectories = [trajectory_tokens(t.sort("step"), cfg.advantage)
                    for t in scored.partition_by("traj_id", maintain_order=True)]
    model.train()
    first_ratio_error, clipped, tokens = None, 0.0, 0.0
    for _ in range(cfg.epochs):
        order = rng.permutation(len(trajectories))
        for start in range(0, len(order), cfg.minibatch):
            batch = [trajectories[i] for i in order[start:start + cfg.minibatch]]
            ids = pad_right([t.ids for t in batch], pad_id, torch.long)                # (B, L)
            attention = pad_right([[1] * len(t.ids) for t in batch], 0, torch.long)    # (B, L)
            # (B, L-1) each, aligned with the predicted tokens ids[:, 1:]
            mask = pad_right([t.is_response for t in batch], False, torch.bool)[:, 1:]
            adv = pad_right([t.advantage for t in batch], 0.0, torch.float32)[:, 1:]
            old = pad_right([t.old_logprob for t in batch], 0.0, torch.float32)[:, 1:]
            ratio = torch.exp(token_logprobs(model, ids, attention) - old)
            surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv)
            loss = -((surrogate * mask).sum(-1) / mask.sum(-1)).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                if first_ratio_error is None:
                    first_ratio_error = float((ratio - 1).abs()[mask].max())
                clipped += float(((ratio - 1).abs() > cfg.clip)[mask].sum())
                tokens += float(mask.sum())
    model.eval()
    return {"first_ratio_error": first_ratio_error or 0.0, "clip_fraction": clipped / tokens}


def iteration_summary(table: pa.Table) -> dict[str, float]:
    """Success rate (per trajectory), mean and std of the logged step entropy, mean steps per trajectory."""
    steps = pl.from_arrow(table).with_columns(step_entropy=pl.col("token_entropy").list.mean())
    trajs = steps.group_by("traj_id").agg(pl.col("success").first(), pl.len().alias("steps"))
    return {"success_rate": trajs["success"].mean(), "mean_step_entropy": steps["step_entropy"].mean(),
            "std_step_entropy": steps["step_entropy"].std(), "mean_steps": trajs["steps"].mean()}


def train(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, cfg: RLConfig, seed: np.random.SeedSequence,
          checkpoints: Path, work: Path, log=print) -> tuple[list[pa.Table], list[dict[str, float]]]:
    """The RL loop; returns every iteration's rollouts (as sampled) and its summary.

    `seed` drives task choice, token sampling and minibatch order. Checkpoint iter_<i> is saved before
    iteration i samples, so it is exactly the policy behind those rows.
    """
    turns = Turns(tokenizer)
    seeds = seed.spawn(3)
    task_rng, update_rng = np.random.default_rng(seeds[0]), np.random.default_rng(seeds[1])
    generator = torch.Generator().manual_seed(int(seeds[2].generate_state(1)[0]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    # one fixed training set of tasks, as RL on ALFWorld-style games usually has: the learning curve
    # then measures the policy rather than how hard each iteration's draw of tasks happened to be
    tasks = [Task.from_seed(int(s)) for s in task_rng.choice(100_000, size=cfg.groups, replace=False)]
    tables, summaries = [], []
    for iteration in range(cfg.iterations):
        clock = [time.perf_counter()]
        checkpoint = checkpoints / f"iter_{iteration}"
        save_checkpoint(model, tokenizer, checkpoint)
        table = collect(model, turns, tasks, cfg, iteration, generator)
        pq.write_table(table, work / f"rollouts_{iteration}.parquet")
        clock.append(time.perf_counter())
        scored = empg_score(work / f"rollouts_{iteration}.parquet", checkpoint, work / f"scored_{iteration}.parquet")
        clock.append(time.perf_counter())
        summary = iteration_summary(table)
        summary["max_entropy_gap"] = float(  # logged vs rescored step entropy, nats
            (scored["step_entropy"] - scored["token_entropy"].list.mean()).abs().max())
        if iteration < cfg.iterations - 1:  # the last policy's update would never be sampled
            summary |= policy_gradient_update(model, optimizer, scored, cfg, update_rng, turns.pad_id)
        clock.append(time.perf_counter())
        seconds = "/".join(f"{b - a:.0f}" for a, b in zip(clock, clock[1:]))
        log(f"iteration {iteration}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items())
            + f" (sample/score/update {seconds} s)")
        tables.append(table)
        summaries.append(summary)
    return tables, summaries
