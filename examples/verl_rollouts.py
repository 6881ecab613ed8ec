"""Log a verl GRPO/PPO batch as empg rollouts (SPEC 2.1), with the exact token ids the policy saw and sampled.

Call it once per training step, after the reward step, from your copy of verl's trainer loop:

    from verl_rollouts import write_verl_batch
    write_verl_batch(f"{rollout_dir}/step_{step}.parquet", iteration=step,
                      prompts=batch.batch["prompts"], responses=batch.batch["responses"],
                      attention_mask=batch.batch["attention_mask"], uids=batch.non_tensor_batch["uid"],
                      rewards=batch.batch["token_level_scores"].sum(-1))

then `empg score rollout_dir/step_200.parquet --model ckpt/global_step_200/actor/huggingface`, or concatenate the
steps' files and give `--model 'ckpt/global_step_{iteration}/actor/huggingface'`.

Why not verl's `trainer.rollout_data_dir` JSONL: it holds `tokenizer.batch_decode(..., skip_special_tokens=True)`
text, so the chat template's special tokens are gone and re-tokenising it does not give the sequence the policy
scored, and it has no `uid`, so GRPO groups are lost. Ids and uids are what make rescoring exact.

The layout read here is verl's single-turn batch: `prompts` (B, P) left-padded, `responses` (B, R) right-padded,
`attention_mask` (B, P + R) over both, one `uid` per prompt repeated for its n samples. Multi-turn agent-loop
batches interleave tool output in `responses` (masked by `response_mask`): split them into one row per model turn
before logging, or empg would score the tool tokens as the policy's.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def verl_batch_table(*, iteration: int, prompts, responses, attention_mask, uids: Sequence[str], rewards,
                     run: str = "default") -> pa.Table:
    """One rollouts row per sample: padding removed from prompt and response ids, `group_id` = uid, `traj_id` =
    the sample's index within its group (in batch order), `step` = 0, `reward` = the sequence's total score."""
    prompts, responses, mask, rewards = (np.asarray(x.cpu() if hasattr(x, "cpu") else x) for x in
                                         (prompts, responses, attention_mask, rewards))
    width = prompts.shape[1]
    prompt_mask, response_mask = mask[:, :width].astype(bool), mask[:, width:].astype(bool)
    seen: dict[str, int] = defaultdict(int)
    traj_ids = []
    for uid in uids:
        traj_ids.append(str(seen[str(uid)]))
        seen[str(uid)] += 1
    n = len(prompts)
    ids = pa.list_(pa.int32())
    return pa.table({
        "run": pa.array([run] * n, pa.string()),
        "iteration": pa.array([iteration] * n, pa.int64()),
        "group_id": pa.array([str(u) for u in uids], pa.string()),
        "traj_id": pa.array(traj_ids, pa.string()),
        "step": pa.array([0] * n, pa.int64()),
        "prompt_ids": pa.array([p[m].tolist() for p, m in zip(prompts, prompt_mask)], ids),
        "response_ids": pa.array([r[m].tolist() for r, m in zip(responses, response_mask)], ids),
        "reward": pa.array(rewards, pa.float64()),
    })


def write_verl_batch(path: str | Path, **batch) -> Path:
    """Write `verl_batch_table(**batch)` to `path`, one file per training step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(verl_batch_table(**batch), path)
    return path
