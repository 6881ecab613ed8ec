"""Trainer layouts written the way each trainer writes them (names, nesting, field types, row order).

Each writer mirrors the trainer's own dump code, not empg's reader, so the ingest tests compare empg's output with
what the trainer wrote. Shared by tests/test_ingest.py and bench/convert.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


def write_verl(root: Path, step: int, rows: list[dict]) -> Path:
    """verl `RayPPOTrainer._dump_generations`: `{global_steps}.jsonl`, json.dumps per line, joined with newlines."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{step}.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


def verl_rows(rng: np.random.Generator, step: int, prompts: int, n: int, v1: bool = False,
              turns: int = 1) -> list[dict]:
    """A GRPO batch as verl dumps it: `n` samples per prompt; the legacy dump is in balanced-batch (shuffled) order,
    the V1 one carries uid = {uid}_{session}_{index}."""
    rows = []
    for p in range(prompts):
        uid = f"9f3c-{p:04d}-uid"
        for session in range(n):
            score = float(rng.integers(0, 2))
            for index in range(turns if v1 else 1):
                row = {"input": f"<question {p}> turn {index}", "output": f"answer {p}.{session}.{index}",
                       "gts": f"truth {p}", "score": score, "step": step, "acc": bool(score), "pred": f"{p}"}
                if v1:
                    row["uid"] = f"{uid}_{session}_{index}"
                rows.append(row)
    if not v1:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    return rows


def write_trl(output_dir: Path, step: int, prompts: int, n: int, rng: np.random.Generator, step_as_text: bool = False,
              ) -> Path:
    """TRL GRPOTrainer: `completions/completions_{step:05d}.parquet` via pandas, columns step, prompt, completion,
    one per reward function (NaN where it returned None), the `log_extra` columns, advantage; prompts repeated n
    times in a row."""
    folder = output_dir / "completions"
    folder.mkdir(parents=True, exist_ok=True)
    rows = prompts * n
    accuracy = rng.integers(0, 2, rows).astype(float)
    accuracy[rng.random(rows) < 0.2] = np.nan
    table = {"step": [str(step) if step_as_text else step] * rows,
             "prompt": [f"<|user|>question {i // n}<|end|><|assistant|>" for i in range(rows)],
             "completion": [f"completion {i}" for i in range(rows)],
             "accuracy_reward": accuracy, "format_reward": rng.random(rows),
             "n_tool_calls": rng.integers(0, 3, rows),          # a `log_extra` column: after the rewards
             "advantage": rng.normal(size=rows)}
    path = folder / f"completions_{step:05d}.parquet"
    pd.DataFrame(table).to_parquet(path)
    return path


def prime_episode(episode_id: str, group: str, step: int, traces: list[dict]) -> dict:
    """A verifiers Episode as prime-rl logs it."""
    return {"id": episode_id, "group": {"id": group}, "run": {"work": {"step": step}}, "traces": traces}


def prime_node(parent: int | None, ids: list[int], sampled: int = 0) -> dict:
    """A verifiers MessageNode as dumped: the ids it adds; a sampled node's last `sampled` ids are its completion
    (mask true), with logprobs and advantages over those only."""
    return {"parent": parent, "message": {"role": "assistant" if sampled else "user", "content": "..."},
            "sampled": bool(sampled), "timestamp": 1.0, "token_ids": ids,
            "mask": [False] * (len(ids) - sampled) + [True] * sampled, "is_content": [],
            "logprobs": [-0.5] * sampled, **({"advantages": [0.1] * sampled} if sampled else {})}


def prime_trace(turns: list[tuple[list[int], list[int]]], rewards: dict[str, tuple[float, float]],
                lead: list[int] | None = None) -> dict:
    """A linear trace: the first turn's input as a root node, then per turn its input (after the first) and a
    sampled node whose ids are `lead` (the generation prompt) then the response."""
    nodes = [prime_node(None, turns[0][0])]
    for t, (observation, response) in enumerate(turns):
        if t > 0:
            nodes.append(prime_node(len(nodes) - 1, observation))
        nodes.append(prime_node(len(nodes) - 1, (lead or []) + response, sampled=len(response)))
    return {"id": "t", "agent": {"name": "agent", "trainable": True, "config": {}}, "nodes": nodes,
            "rewards": {k: {"score": s, "weight": w} for k, (s, w) in rewards.items()}, "metrics": {}}


def write_prime(root: Path, step: int, episodes: list[dict], split: str = "train", subset: str = "all") -> Path:
    folder = root / "rollouts" / f"step_{step}" / split / subset
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "traces.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in episodes))
    return path


def write_art(root: Path, split: str, step: int, trajectories: list[dict]) -> Path:
    """ART parquet v2: `trajectories/{split}/{step:04d}.parquet`, one row per trajectory."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.string()),
                         ("tool_call_id", pa.string()), ("trainable", pa.bool_())])
    folder = root / "trajectories" / split
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"group_index": pa.array([t["group_index"] for t in trajectories], pa.int64()),
                      "trajectory_index": pa.array([t["trajectory_index"] for t in trajectories], pa.int64()),
                      "reward": pa.array([t["reward"] for t in trajectories], pa.float64()),
                      "messages": pa.array([t["messages"] for t in trajectories], pa.list_(message)),
                      "metrics": pa.array([json.dumps({"turns": 1}) for _ in trajectories], pa.string())})
    path = folder / f"{step:04d}.parquet"
    pq.write_table(table, path)
    return path


def write_rllm(root: Path, step: int, task: str, rollout: int, trajectories: list[dict], mode: str = "train") -> Path:
    """rLLM `EpisodeLogger.log_episode`: `episodes/{mode}_step_{step}_epoch_{epoch}/episode_hash{h}_id{id}.json`,
    the episode id's ':' made '_' in the name, json.dumps(indent=2) plus a newline."""
    folder = root / "episodes" / f"{mode}_step_{step}_epoch_0"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"episode_hash0badc0de_id{task}_{rollout}.json"
    path.write_text(json.dumps({"training_step": step, "epoch": 0, "episode_id": f"{task}:{rollout}",
                                "session_id": None, "task": {"question": task}, "task_hash": "0badc0de",
                                "is_correct": True, "termination_reason": "env_done", "metrics": {},
                                "metadata": {}, "timing": {}, "trajectories": trajectories}, indent=2) + "\n")
    return path


def write_areal(root: Path, version: int, task_id: int, samples: list[dict], folder: str = "rollout") -> Path:
    """AReaL `WorkflowExecutor._dump_trajectory`: `{rollout,eval-rollout}/{tail_version}/{task_id}.jsonl`, one
    json.dumps line per sample appended."""
    directory = root / folder / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{task_id}.jsonl"
    with open(path, "a") as fh:
        for i, sample in enumerate(samples):
            fh.write(json.dumps({"task_id": task_id, "sample_idx": i, "seqlen": 12, "prompt_len": 8,
                                 "head_version": version, "tail_version": version, **sample}) + "\n")
    return path
