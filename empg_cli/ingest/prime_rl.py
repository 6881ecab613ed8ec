"""prime-rl's rollout traces: `rollouts/step_N/{train,eval}/{all,effective}/traces.jsonl`, one verifiers Episode a line.

An Episode names its group (`group.id`) and the step that dispatched it (`run.work.step`), and holds `traces[]`, one
per agent. A trace is a graph of message `nodes[]`: each node has its `parent` (the index of an earlier node, null at
a root), whether the model `sampled` it, its `token_ids` (the tokens it adds to its parent's path: the template
scaffold, then the message; for an assistant, the generation prompt then the completion), a per-token `mask` (true
on the sampled completion only) and `logprobs` over the masked-in tokens; the trace's `rewards` map a name to
{score, weight} (or null). Concatenating `token_ids` along a root-to-node path gives exactly the ids the model saw.

One trace of a trainable agent is one trajectory; its steps are its sampled nodes in order (a linear trace has one
path; compaction and subagents add branches, and every branch's turns were trained on). A step's response is its
node's masked-in tokens, its prompt every token of its path before them: the ids are exact.

Given a folder, the `train/effective` traces are read (what the trainer admitted into its batches), else
`train/all` (every completed episode, failures and rejected work included); name a traces.jsonl file to read
another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from ..errors import BadInput
from .common import Converted, Options, TokenLists, json_lines, need, preferred_files, rollouts_frame

FIDELITY = "ids"
PATTERN = "traces.jsonl"
SUBSETS = ("effective", "all")
"""Which `train/` subset a folder is read from, first found first."""


def trace_steps(trace: dict[str, Any], path: Path, line: int, tokens: list[int]) -> list[tuple]:
    """Append the trace's node paths to `tokens` (a branch copies its parent's path, a chain just extends it); for
    each sampled node, return (path start, response start, response end, logprobs): its prompt is
    tokens[path start:response start]."""
    nodes = need(trace, "nodes", path, line, "traces[].")
    spans: list[tuple[int, int]] = []  # where each node's root path lies in `tokens`
    steps = []
    for i, node in enumerate(nodes):
        ids = node.get("token_ids") if isinstance(node, dict) else None
        if ids is None:
            need(node, "token_ids", path, line, "traces[].nodes[].")
        parent = node.get("parent")
        if parent is None:
            start = len(tokens)
        elif isinstance(parent, int) and 0 <= parent < i:
            start, end = spans[parent]
            if end != len(tokens):  # a branch: copy its parent's path to the end
                tokens.extend(tokens[start:end])
                start = len(tokens) - (end - start)
        else:
            raise BadInput(path, f"line {line} has a node whose parent {parent!r} is not an earlier node")
        own = len(tokens)
        tokens.extend(ids)
        spans.append((start, len(tokens)))
        mask = node.get("mask")
        if mask is None:
            mask = [bool(node.get("sampled"))] * len(ids)
        if len(mask) != len(ids):
            raise BadInput(path, f"line {line} has a node with {len(ids)} token_ids and {len(mask)} mask entries")
        if node.get("sampled") and True in mask:  # the model's tokens: the masked-in run
            first, last = mask.index(True), len(mask) - 1 - mask[::-1].index(True)
            if not all(mask[first:last + 1]):
                raise BadInput(path, f"line {line} has a sampled node whose masked-in tokens are not contiguous")
            logprobs = node.get("logprobs") or None
            if logprobs is not None and len(logprobs) != last - first + 1:
                raise BadInput(path, f"line {line} has a node with {last - first + 1} sampled tokens and "
                                     f"{len(logprobs)} logprobs")
            steps.append((start, own + first, own + last + 1, logprobs))
    return steps


def read_file(path: Path, rows: dict[str, Any], tokens: list[int]) -> None:
    """Append the steps of every episode in the file to `rows`, their path tokens to `tokens`."""
    for line, episode in json_lines(path):
        group = need(need(episode, "group", path, line), "id", path, line, "group.")
        iteration = need(need(need(episode, "run", path, line), "work", path, line, "run."), "step", path, line,
                         "run.work.")
        for t, trace in enumerate(need(episode, "traces", path, line)):
            if (trace.get("agent") or {}).get("trainable") is False:
                continue
            rewards = [r for r in (trace.get("rewards") or {}).values() if r and r.get("score") is not None]
            reward = sum(float(r["score"]) * float(r.get("weight", 1.0)) for r in rewards)
            steps = trace_steps(trace, path, line, tokens)
            rows["iteration"] += [iteration] * len(steps)
            rows["group_id"] += [str(group)] * len(steps)
            rows["traj_id"] += [f"{episode.get('id', line)}/{t}"] * len(steps)
            rows["step"] += range(len(steps))
            rows["reward"] += [reward] * len(steps)
            for base, start, end, logprobs in steps:
                rows["spans"] += (base, start, end)
                rows["logprobs"].add(logprobs)


def spans_to_lists(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> pl.Series:
    """tokens[starts[i]:ends[i]] for every i, as one list column, gathered at once."""
    lengths = ends - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    index = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - starts, lengths)
    return pl.Series(pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(tokens[index])))


def _in_train(subset: str):
    return lambda file: (file.parent.parent.name, file.parent.name) == ("train", subset)


def read(sources: Sequence[Path], options: Options) -> Converted:
    rows: dict[str, Any] = {k: [] for k in ("iteration", "group_id", "traj_id", "step", "reward", "spans")}
    rows["logprobs"], tokens = TokenLists(), []
    for path in preferred_files(sources, PATTERN, *map(_in_train, SUBSETS)):
        read_file(path, rows, tokens)
    if not rows["step"]:
        raise BadInput(sources[0], "has no sampled tokens in any trace")
    flat = np.asarray(tokens, dtype=np.int32)
    base, start, end = np.asarray(rows.pop("spans"), dtype=np.int64).reshape(-1, 3).T
    rows["prompt_ids"], rows["response_ids"] = spans_to_lists(flat, base, start), spans_to_lists(flat, start, end)
    logprobs = rows.pop("logprobs").series("logprobs", pl.Float32)
    return Converted(rollouts_frame(rows, pl.DataFrame([logprobs]), options.run), FIDELITY)
