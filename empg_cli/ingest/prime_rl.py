"""prime-rl's rollout traces: `rollouts/step_N/{train,eval}/{all,effective}/traces.jsonl`, one verifiers Episode a line.

An Episode names its group (`group.id`) and the policy version that sampled it (`run.work.step`), and holds
`traces[]`. A trace is a tree of `nodes[]`: each node has its `parent` (an index, null at the root), whether the
model `sampled` it, its `token_ids` (the tokens it adds to its parent's), a per-token `mask` (true: trained on),
`logprobs` and `advantages`; the trace's `rewards` map a name to {score, weight}. One trace is one trajectory; its
steps are the sampled nodes on the path from the root to the last node, in order. The ids are exact: a step's
response is its node's masked-in tokens, its prompt every token of the path before them.

Given a folder, the `train/all` traces are read (the `effective` ones are a subset of them, `eval` is not training);
name a traces.jsonl file to read another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import polars as pl

from ..errors import BadInput
from .common import Converted, Options, json_lines, layout_files, need, rollouts_frame

FIDELITY = "ids"
PATTERN = "traces.jsonl"
TRAINING = ("train", "all")


def path_to_leaf(nodes: list[dict[str, Any]], path: Path, line: int) -> list[dict[str, Any]]:
    """The nodes from the root to the last node, root first."""
    chain, index, seen = [], len(nodes) - 1, set()
    while index is not None:
        if not isinstance(index, int) or not 0 <= index < len(nodes) or index in seen:
            raise BadInput(path, f"line {line} has a node whose parent {index!r} is not an earlier node")
        seen.add(index)
        chain.append(nodes[index])
        index = nodes[index].get("parent")
    return chain[::-1]


def trace_steps(trace: dict[str, Any], path: Path, line: int) -> list[dict[str, list]]:
    """(prompt_ids, response_ids, logprobs) of each sampled node along the trace's path."""
    nodes = need(trace, "nodes", path, line, "traces[].")
    if not nodes:
        raise BadInput(path, f"line {line} has a trace with no nodes")
    steps, context = [], []
    for node in path_to_leaf(nodes, path, line):
        ids = need(node, "token_ids", path, line, "traces[].nodes[].")
        mask = node.get("mask")
        if mask is None:
            mask = [bool(node.get("sampled"))] * len(ids)
        if len(mask) != len(ids):
            raise BadInput(path, f"line {line} has a node with {len(ids)} token_ids and {len(mask)} mask entries")
        kept = [i for i, m in enumerate(mask) if m]
        if node.get("sampled") and kept:
            first, last = kept[0], kept[-1]
            if last - first + 1 != len(kept):
                raise BadInput(path, f"line {line} has a sampled node whose masked-in tokens are not contiguous")
            logprobs = node.get("logprobs")
            steps.append({"prompt_ids": context + ids[:first], "response_ids": ids[first:last + 1],
                          "logprobs": logprobs[first:last + 1] if logprobs is not None else None})
        context = context + ids
    return steps


def read_file(path: Path, options: Options) -> dict[str, list]:
    rows: dict[str, list] = {k: [] for k in ("iteration", "group_id", "traj_id", "step", "prompt_ids",
                                             "response_ids", "reward", "logprobs")}
    for line, episode in json_lines(path):
        group = need(need(episode, "group", path, line), "id", path, line, "group.")
        iteration = need(need(need(episode, "run", path, line), "work", path, line, "run."), "step", path, line,
                         "run.work.")
        for t, trace in enumerate(need(episode, "traces", path, line)):
            rewards = trace.get("rewards") or {}
            reward = sum(float(r["score"]) * float(r.get("weight", 1.0)) for r in rewards.values()
                         if r.get("score") is not None)
            for s, step in enumerate(trace_steps(trace, path, line)):
                rows["iteration"].append(iteration)
                rows["group_id"].append(str(group))
                rows["traj_id"].append(f"{episode.get('id', line)}/{t}")
                rows["step"].append(s)
                rows["reward"].append(reward)
                for key in ("prompt_ids", "response_ids", "logprobs"):
                    rows[key].append(step[key])
    return rows


def training_traces(sources: Sequence[Path]) -> list[Path]:
    """The traces.jsonl files named, and under each folder its `train/all` ones (all of them if it has none)."""
    files = []
    for source in sources:
        found = layout_files([source], PATTERN)
        training = [f for f in found if (f.parent.parent.name, f.parent.name) == TRAINING]
        files.extend(training or found)
    return files


def read(sources: Sequence[Path], options: Options) -> Converted:
    rows: dict[str, list] = {}
    for path in training_traces(sources):
        for key, values in read_file(path, options).items():
            rows.setdefault(key, []).extend(values)
    if not rows.get("step"):
        raise BadInput(sources[0], "has no sampled tokens in any trace")
    logprobs = pl.Series("logprobs", rows.pop("logprobs"), pl.List(pl.Float32))
    return Converted(rollouts_frame(rows, pl.DataFrame([logprobs]), options.run), FIDELITY)
