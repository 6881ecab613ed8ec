"""Rollouts rows from a verl trainer's in-memory batch, with the exact token ids the policy saw and sampled.

Call one of these once per training step, after the reward step, and write the table with `write_rollouts`:

    from empg_cli.ingest import verl_batch_table, write_rollouts
    write_rollouts(f"{rollout_dir}/step_{step}.parquet", verl_batch_table(
        iteration=step, prompts=batch.batch["prompts"], responses=batch.batch["responses"],
        attention_mask=batch.batch["attention_mask"], uids=batch.non_tensor_batch["uid"],
        rewards=batch.batch["token_level_scores"].sum(-1)))

then `empg score rollout_dir --model 'ckpt/global_step_{iteration}/actor/huggingface'`.

All three read verl's padded layout: `prompts` (B, P) left-padded, `responses` (B, R) right-padded and
`attention_mask` (B, P + R) over both. They differ in what one row is:

- `verl_batch_table`: one single-turn sample (GRPO/PPO); `uid` = its prompt's group.
- `verl_agent_loop_table`: a whole multi-turn trajectory (verl's agent loop). `response_mask` (B, R) is 1 on the
  model's tokens and 0 on tool/observation tokens: each contiguous run of 1s is one step, and the tokens between
  runs join the next step's prompt.
- `verl_agent_table`: one step of a trajectory (verl-agent), with `uid` (the group) and `traj_uid`; the step index
  is the row's order within its `traj_uid`, so call it on the batch before `_balance_batch` reorders rows.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from ..output import atomic_output, write_parquet

IDS = pa.list_(pa.int32())


def _numpy(x) -> np.ndarray:
    return np.asarray(x.cpu() if hasattr(x, "cpu") else x)


def _unpadded(prompts, responses, attention_mask) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Each row's prompt ids and response ids with padding removed, and the response part of the mask (B, R)."""
    prompts, responses, mask = _numpy(prompts), _numpy(responses), _numpy(attention_mask).astype(bool)
    width = prompts.shape[1]
    return ([p[m] for p, m in zip(prompts, mask[:, :width])], [r[m] for r, m in zip(responses, mask[:, width:])],
            mask[:, width:])


def _index_within(keys: Sequence) -> list[int]:
    """For each key, how many times it appeared before (0, 1, 2, ... per key, in order)."""
    seen: dict[str, int] = defaultdict(int)
    order = []
    for key in keys:
        order.append(seen[str(key)])
        seen[str(key)] += 1
    return order


def _table(run: str, iteration: int, group_ids: Sequence, traj_ids: Sequence, steps: Sequence[int],
           prompt_ids: Sequence, response_ids: Sequence, rewards: Sequence[float]) -> pa.Table:
    n = len(steps)
    return pa.table({
        "run": pa.array([run] * n, pa.string()),
        "iteration": pa.array([iteration] * n, pa.int64()),
        "group_id": pa.array([str(g) for g in group_ids], pa.string()),
        "traj_id": pa.array([str(t) for t in traj_ids], pa.string()),
        "step": pa.array(steps, pa.int64()),
        "prompt_ids": pa.array([np.asarray(p).tolist() for p in prompt_ids], IDS),
        "response_ids": pa.array([np.asarray(r).tolist() for r in response_ids], IDS),
        "reward": pa.array(np.asarray(rewards, dtype=np.float64), pa.float64()),
    })


def verl_batch_table(*, iteration: int, prompts, responses, attention_mask, uids: Sequence[str], rewards,
                     run: str = "default") -> pa.Table:
    """One row per sample: `group_id` = uid, `traj_id` = the sample's index within its group, `step` = 0,
    `reward` = the sequence's total score."""
    prompt_ids, response_ids, _ = _unpadded(prompts, responses, attention_mask)
    return _table(run, iteration, uids, _index_within(uids), [0] * len(uids), prompt_ids, response_ids,
                  _numpy(rewards))


def verl_agent_loop_table(*, iteration: int, prompts, responses, attention_mask, response_mask,
                          uids: Sequence[str], rewards, run: str = "default") -> pa.Table:
    """One row per model turn of each multi-turn row: a turn is a contiguous run of response_mask == 1; its prompt
    is the row's prompt and every response token before the run (earlier turns and tool output)."""
    prompt_ids, response_ids, kept = _unpadded(prompts, responses, attention_mask)
    model, rewards = _numpy(response_mask).astype(bool), _numpy(rewards)
    trajs = _index_within(uids)
    rows: dict[str, list] = defaultdict(list)
    for b, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        turn = model[b][kept[b]].astype(np.int8)  # over the row's real response tokens
        edges = np.diff(np.concatenate([[0], turn, [0]]))
        for step, (start, end) in enumerate(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))):
            rows["group"].append(uids[b])
            rows["traj"].append(trajs[b])
            rows["step"].append(step)
            rows["reward"].append(rewards[b])
            rows["prompt"].append(np.concatenate([prompt, response[:start]]))
            rows["response"].append(response[start:end])
    return _table(run, iteration, rows["group"], rows["traj"], rows["step"], rows["prompt"], rows["response"],
                  rows["reward"])


def verl_agent_table(*, iteration: int, prompts, responses, attention_mask, uids: Sequence[str],
                     traj_uids: Sequence[str], rewards, run: str = "default") -> pa.Table:
    """One row per step row of a verl-agent batch: `group_id` = uid, `traj_id` = traj_uid, `step` = the row's
    order within its traj_uid (call before batch balancing), `reward` = the row's episode reward."""
    prompt_ids, response_ids, _ = _unpadded(prompts, responses, attention_mask)
    return _table(run, iteration, uids, traj_uids, _index_within(traj_uids), prompt_ids, response_ids,
                  _numpy(rewards))


def write_rollouts(path: str | Path, table: pa.Table) -> Path:
    """Write one step's rollouts table to `path` (folders made as needed; a rerun of the step replaces it),
    atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite=True) as temp:
        write_parquet(temp, [table])
    return path
