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

Files are read in pieces of whole lines (two processes share them when there is enough to read): Python only pulls
each node's fields out of the parsed JSON; the checks, the root-to-node paths and the gathering of ids run in numpy
over all nodes of the piece at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from pathlib import Path
from typing import Any, Sequence

import msgspec
import numpy as np
import polars as pl

from ..errors import BadInput
from .common import (Converted, Options, Piece, arrow, gather_spans, json_lines, list_series,
                     parsed_objects_kept, preferred_files, present, read_pieces, rollouts_frame)

FIDELITY = "ids"
PATTERN = "traces.jsonl"
SUBSETS = ("effective", "all")
"""Which `train/` subset a folder is read from, first found first."""
NODE = "traces[].nodes[]."


class Node(msgspec.Struct, gc=False):
    """The fields of a MessageNode that empg reads: the others (message, timestamp, advantages...) are skipped
    without building Python objects, and a field of another type is an error naming where it is."""

    token_ids: list[int] | None = None
    mask: list[bool] | None = None
    parent: int | None = None
    sampled: bool | None = None
    logprobs: list[float] | None = None


class Reward(msgspec.Struct, gc=False):
    score: float | None = None
    weight: float = 1.0


class Agent(msgspec.Struct, gc=False):
    trainable: bool | None = None


class Trace(msgspec.Struct, gc=False):
    nodes: list[Node] | None = None
    rewards: dict[str, Reward | None] | None = None
    agent: Agent | None = None


class Group(msgspec.Struct, gc=False):
    id: str | int | None = None


class Work(msgspec.Struct, gc=False):
    step: int | None = None


class Run(msgspec.Struct, gc=False):
    work: Work | None = None


class Episode(msgspec.Struct, gc=False):
    """A line of traces.jsonl, as far as empg reads it."""

    id: str | int | None = None
    group: Group | None = None
    run: Run | None = None
    traces: list[Trace] | None = None


EPISODE = msgspec.json.Decoder(Episode)


@dataclass
class Traces:
    """The trainable traces of a piece's episodes: one entry per trace, their nodes flat in order."""

    lines: list[int] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    traj_ids: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    problem: BadInput | None = None
    """An episode-level problem met while gathering: it stops the piece, and is raised unless a node before it has
    one (problems are raised in file order)."""


def gather(path: Path, episodes: Sequence[tuple[int, Episode]]) -> Traces:
    """Each trainable trace of the episodes: its line, keys, reward Σ score · weight and nodes."""
    traces = Traces()
    try:
        for line, episode in episodes:
            group = present(present(episode.group, "group", path, line).id, "group.id", path, line)
            work = present(present(episode.run, "run", path, line).work, "run.work", path, line)
            iteration = present(work.step, "run.work.step", path, line)
            for t, trace in enumerate(present(episode.traces, "traces", path, line)):
                if trace.agent is not None and trace.agent.trainable is False:
                    continue
                nodes = present(trace.nodes, "traces[].nodes", path, line)
                traces.lines.append(line)
                traces.iterations.append(iteration)
                traces.groups.append(str(group))
                traces.traj_ids.append(f"{line if episode.id is None else episode.id}/{t}")
                traces.rewards.append(sum(r.score * r.weight for r in (trace.rewards or {}).values()
                                          if r is not None and r.score is not None))
                traces.sizes.append(len(nodes))
                traces.nodes.extend(nodes)
    except BadInput as problem:
        traces.problem = problem
    return traces


FIELDS = attrgetter("token_ids", "mask", "parent", "sampled", "logprobs")


def _node_fields(nodes: list[Node]) -> tuple[tuple[Any, ...], ...]:
    """The FIELDS of every node, one tuple a field."""
    return tuple(zip(*map(FIELDS, nodes))) or ((),) * 5


def _lengths(values: tuple[Any, ...], missing: int) -> list[int]:
    """len() of each value, `missing` for None."""
    if None in values:
        return [missing if v is None else len(v) for v in values]
    return list(map(len, values))


def _masked_run(mask: list) -> tuple[int, int, int]:
    """(first, last, count) of a node mask's true entries; (0, -1, 0) when it has none."""
    if True not in mask:
        return 0, -1, 0
    return mask.index(True), len(mask) - 1 - mask[::-1].index(True), mask.count(True)


def _first_problem(path: Path, line: np.ndarray, checks: list[tuple[np.ndarray, Any]]) -> BadInput | None:
    """The problem of the first node flagged by any check (at one node, the first check): `checks` pairs a flag per
    node with a function of the node's index that says what is wrong."""
    flagged = [(int(np.argmax(flags)), order) for order, (flags, _) in enumerate(checks) if flags.any()]
    if not flagged:
        return None
    node, order = min(flagged)
    return BadInput(path, f"line {line[node]} {checks[order][1](node)}")


def chunk_steps(path: Path, traces: Traces) -> pl.DataFrame:
    """The steps of the traces (one row per sampled node with masked-in tokens), every node checked first."""
    ids, masks, parents, sampled_flags, logprobs = _node_fields(traces.nodes)
    count = len(ids)
    sizes = np.asarray(traces.sizes, np.int64)
    trace_start = np.repeat(np.cumsum(sizes) - sizes, sizes)                 # each node's trace's first node
    local = np.arange(count) - trace_start                                   # index within its trace
    root = np.array([p is None for p in parents], bool)
    parent = np.array([-1 if p is None else p for p in parents], np.int64)
    lengths = _lengths(ids, 0)
    n_ids = np.array(lengths, np.int64)
    n_mask = np.where([m is None for m in masks], n_ids, _lengths(masks, 0))
    n_logprobs = np.array(_lengths(logprobs, 0), np.int64)
    n_logprobs[n_logprobs == 0] = -1                                          # none logged (null or [])

    # A sampled node's masked-in run [first, last] and its number of masked-in tokens; without a mask, all tokens.
    first, last, hits = np.zeros(count, np.int64), np.full(count, -1), np.zeros(count, np.int64)
    sampled = np.flatnonzero(np.array(sampled_flags, bool))
    runs = [(0, lengths[k] - 1, lengths[k]) if masks[k] is None else _masked_run(masks[k]) for k in sampled]
    first[sampled], last[sampled], hits[sampled] = np.array(runs, np.int64).reshape(-1, 3).T
    is_step = hits > 0
    problem = _first_problem(path, np.repeat(np.asarray(traces.lines, np.int64), sizes), [
        (np.array([x is None for x in ids], bool), lambda k: f"has no field '{NODE}token_ids'"),
        (~root & ((parent < 0) | (parent >= local)),
         lambda k: f"has a node whose parent {parents[k]!r} is not an earlier node"),
        (n_mask != n_ids, lambda k: f"has a node with {n_ids[k]} token_ids and {n_mask[k]} mask entries"),
        (is_step & (hits != last - first + 1), lambda k: "has a sampled node whose masked-in tokens are not contiguous"),
        (is_step & (n_logprobs >= 0) & (n_logprobs != last - first + 1),
         lambda k: f"has a node with {last[k] - first[k] + 1} sampled tokens and {n_logprobs[k]} logprobs")])
    if problem or traces.problem:
        raise problem or traces.problem

    steps = np.flatnonzero(is_step)
    up = np.where(root, -1, trace_start + parent)                             # each node's parent, -1 at a root
    # Root-to-node paths, climbed from every step's node at once: each ancestor adds its whole node as a segment
    # of the step's prompt, then the step's own node adds its tokens before the masked-in run.
    seg_step, seg_node, seg_depth = [np.arange(len(steps))], [steps], [np.full(len(steps), -1)]
    climbing, node = np.arange(len(steps)), up[steps]
    while len(node):
        alive = node >= 0
        climbing, node = climbing[alive], node[alive]
        seg_step.append(climbing), seg_node.append(node), seg_depth.append(np.full(len(node), len(seg_depth) - 1))
        node = up[node]
    step_of, node_of, depth = map(np.concatenate, (seg_step, seg_node, seg_depth))
    order = np.lexsort((-depth, step_of))                                     # by step, root first, own node last
    step_of, node_of, depth = step_of[order], node_of[order], depth[order]
    seg_length = np.where(depth < 0, first[node_of], n_ids[node_of])
    offset = np.concatenate([[0], np.cumsum(n_ids)])                          # each node's ids in `tokens`
    tokens = np.fromiter(chain.from_iterable(ids), np.int32, int(offset[-1]))
    response_length = last[steps] - first[steps] + 1
    step_logprobs = [logprobs[k] for k in steps]

    trace_of = np.repeat(np.arange(len(sizes)), sizes)[steps]
    per_trace = pl.DataFrame({"iteration": traces.iterations, "group_id": traces.groups,
                              "traj_id": traces.traj_ids, "reward": traces.rewards})
    return per_trace.select(pl.all().gather(trace_of)).with_columns(
        step=np.arange(len(steps)) - np.searchsorted(trace_of, trace_of),    # rank within its trace
        prompt_ids=list_series(np.bincount(step_of, seg_length, len(steps)).astype(np.int64),
                               arrow(gather_spans(tokens, offset[node_of], seg_length))),
        response_ids=list_series(response_length, arrow(gather_spans(tokens, offset[steps] + first[steps],
                                                                      response_length))),
        logprobs=list_series(np.maximum(n_logprobs[steps], 0), arrow(np.fromiter(
            chain.from_iterable(lp for lp in step_logprobs if lp is not None), np.float32)),
            nulls=n_logprobs[steps] < 0))


def read_piece(piece: Piece) -> pl.DataFrame:
    """The steps of the episodes of one piece of a traces file; its parsed episodes die with this call. A line that
    is not JSON is raised after the lines before it are checked."""
    episodes: list[tuple[int, Episode]] = []
    unreadable = None
    with parsed_objects_kept():
        try:
            episodes.extend(json_lines(piece.path, piece, EPISODE.decode))
        except BadInput as problem:
            unreadable = problem
        traces = gather(piece.path, episodes)
        traces.problem = traces.problem or unreadable
        return chunk_steps(piece.path, traces)


def _in_train(subset: str):
    return lambda file: (file.parent.parent.name, file.parent.name) == ("train", subset)


def read(sources: Sequence[Path], options: Options) -> Converted:
    frames = read_pieces(read_piece, preferred_files(sources, PATTERN, *map(_in_train, SUBSETS)))
    frame = pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()
    if frame.height == 0:
        raise BadInput(sources[0], "has no sampled tokens in any trace")
    logprobs = frame.select("logprobs")
    return Converted(rollouts_frame(frame.drop("logprobs").to_dict(), logprobs, options.run), FIDELITY)
