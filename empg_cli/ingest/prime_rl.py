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

import numpy as np
import polars as pl
import pyarrow as pa

from ..errors import BadInput
from .common import Converted, Options, TokenLists, json_lines, layout_files, need, rollouts_frame

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


def trace_steps(trace: dict[str, Any], path: Path, line: int, tokens: list[int]) -> list[tuple]:
    """Append the trace's path tokens to `tokens`; for each sampled node along the path, return
    (prompt start, response start, response end, logprobs): its prompt is tokens[prompt start:response start]."""
    nodes = need(trace, "nodes", path, line, "traces[].")
    if not nodes:
        raise BadInput(path, f"line {line} has a trace with no nodes")
    steps, base = [], len(tokens)
    for node in path_to_leaf(nodes, path, line):
        ids = need(node, "token_ids", path, line, "traces[].nodes[].")
        mask = node.get("mask")
        if mask is None:
            mask = [bool(node.get("sampled"))] * len(ids)
        if len(mask) != len(ids):
            raise BadInput(path, f"line {line} has a node with {len(ids)} token_ids and {len(mask)} mask entries")
        if node.get("sampled") and True in mask:  # the model's tokens: the masked-in run
            first, last = mask.index(True), len(mask) - 1 - mask[::-1].index(True)
            if not all(mask[first:last + 1]):
                raise BadInput(path, f"line {line} has a sampled node whose masked-in tokens are not contiguous")
            logprobs = node.get("logprobs")
            start = len(tokens) + first
            steps.append((base, start, start + last - first + 1,
                          logprobs[first:last + 1] if logprobs is not None else None))
        tokens.extend(ids)
    return steps


def read_file(path: Path, rows: dict[str, Any], tokens: list[int]) -> None:
    """Append the steps of every episode in the file to `rows`, their path tokens to `tokens`."""
    for line, episode in json_lines(path):
        group = need(need(episode, "group", path, line), "id", path, line, "group.")
        iteration = need(need(need(episode, "run", path, line), "work", path, line, "run."), "step", path, line,
                         "run.work.")
        for t, trace in enumerate(need(episode, "traces", path, line)):
            rewards = trace.get("rewards") or {}
            reward = sum(float(r["score"]) * float(r.get("weight", 1.0)) for r in rewards.values()
                         if r.get("score") is not None)
            for s, (base, start, end, logprobs) in enumerate(trace_steps(trace, path, line, tokens)):
                rows["iteration"].append(iteration)
                rows["group_id"].append(str(group))
                rows["traj_id"].append(f"{episode.get('id', line)}/{t}")
                rows["step"].append(s)
                rows["reward"].append(reward)
                rows["spans"].append((base, start, end))
                rows["logprobs"].add(logprobs)


def spans_to_lists(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> pl.Series:
    """tokens[starts[i]:ends[i]] for every i, as one list column, gathered at once."""
    lengths = ends - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    index = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - starts, lengths)
    return pl.Series(pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(tokens[index])))


def training_traces(sources: Sequence[Path]) -> list[Path]:
    """The traces.jsonl files named, and under each folder its `train/all` ones (all of them if it has none)."""
    files = []
    for source in sources:
        found = layout_files([source], PATTERN)
        training = [f for f in found if (f.parent.parent.name, f.parent.name) == TRAINING]
        files.extend(training or found)
    return files


def read(sources: Sequence[Path], options: Options) -> Converted:
    rows: dict[str, Any] = {k: [] for k in ("iteration", "group_id", "traj_id", "step", "reward", "spans")}
    rows["logprobs"], tokens = TokenLists(), []
    for path in training_traces(sources):
        read_file(path, rows, tokens)
    if not rows["step"]:
        raise BadInput(sources[0], "has no sampled tokens in any trace")
    flat = np.asarray(tokens, dtype=np.int32)
    base, start, end = np.asarray(rows.pop("spans"), dtype=np.int64).reshape(-1, 3).T
    rows["prompt_ids"], rows["response_ids"] = spans_to_lists(flat, base, start), spans_to_lists(flat, start, end)
    logprobs = rows.pop("logprobs").series("logprobs", pl.Float32)
    return Converted(rollouts_frame(rows, pl.DataFrame([logprobs]), options.run), FIDELITY)
