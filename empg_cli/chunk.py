"""Chunks of whole trajectories: how a file is cut into them, how their rows are read, and how one is scored.

`score_chunk` is the one code path that turns a chunk's rows into per-step results; the local engine and every Ray
worker run it. Its result (a "part") is a small table, one row per step, that the work folder commits:
`_row` (the input row), the step statistics of the scored table, the per-token lists with --token-level, and provenance
per step (`_truncated`, `_shared`, `_weights`, `_device`, `_dtype`) that survives being concatenated by Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from .config import ScoreConfig
from .errors import BadInput
from .rollouts import InputFiles, open_parquet
from .schema import TRAJ_KEYS, is_text
from .sequences import TokenRows, check_vocabulary, plan_units, token_rows
from .validation import ROW, Problems

if TYPE_CHECKING:
    from .rollouts import Rollouts
    from .scoring import Policy

MAX_CHUNK_STEPS = 10_000
"""No chunk holds more steps than this, so work is committed at least every 10,000 steps."""
CHARS_PER_TOKEN = 4
"""Text is sized before any tokenizer is loaded: about 4 characters a token."""
STEP_COLUMNS = ["n_response_tokens", "step_entropy", "step_renyi2", "step_logprob", "step_grad_norm_sq",
                "step_grad_norm_sq_expected"]
KEY_COLUMNS = [ROW, *TRAJ_KEYS, "step"]


@dataclass(frozen=True)
class Source:
    """Where a chunk's rows come from: the input file and its prompt / response columns."""

    path: InputFiles
    """The input's Parquet file(s); error messages name each row's own file and row."""
    input_column: str
    output_column: str
    logged_entropy: bool
    """The file has `token_entropy`: its lengths are checked against the model's tokenisation."""

    @property
    def columns(self) -> list[str]:
        return [self.input_column, self.output_column] + ["token_entropy"] * self.logged_entropy

    @classmethod
    def of(cls, rollouts: Rollouts) -> "Source":
        return cls(rollouts.source, rollouts.input_column, rollouts.output_column,
                   "token_entropy" in rollouts.schema.names)


def _sizes(array: pa.ChunkedArray) -> np.ndarray:
    """Approximate tokens per row: list lengths for ids, characters / 4 for text and chat messages."""
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        if pa.types.is_struct(array.type.value_type):  # messages: the characters of all their contents
            content = pc.utf8_length(pc.struct_field(pc.list_flatten(array), "content")).to_numpy(zero_copy_only=False)
            parents = pc.list_parent_indices(array).to_numpy()
            chars = np.bincount(parents, weights=np.nan_to_num(content.astype(float)), minlength=len(array))
            return chars.astype(np.int64) // CHARS_PER_TOKEN + 1
        return pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
    assert is_text(array.type), array.type
    return pc.utf8_length(array).to_numpy(zero_copy_only=False).astype(np.int64) // CHARS_PER_TOKEN + 1


def row_costs(rollouts: Rollouts, rows_per_chunk: int) -> np.ndarray:
    """Tokens to score per row (prompt + response), to size chunks; an upper bound for prefix-chained steps."""
    costs = np.zeros(rollouts.steps.height, dtype=np.int64)
    for offset, table in rollouts.chunks([rollouts.input_column, rollouts.output_column], rows_per_chunk):
        costs[offset:offset + table.num_rows] = sum(_sizes(table.column(c)) for c in table.column_names)
    return costs


def plan_chunks(steps: pl.DataFrame, costs: np.ndarray, done: np.ndarray,
                budget: Callable[[int], int]) -> Iterator[np.ndarray]:
    """Input rows of each chunk (ascending): whole trajectories not yet done, in the order their last row appears in
    the file, at most `budget(left)` tokens (asked afresh for every chunk, `left` the tokens not yet planned) and
    MAX_CHUNK_STEPS steps, one trajectory at least."""
    trajs = (steps.select(TRAJ_KEYS + [ROW]).with_columns(cost=pl.Series(costs), done=pl.Series(done))
             .group_by(TRAJ_KEYS).agg(pl.col(ROW), pl.col(ROW).max().alias("last"), pl.col("cost").sum(),
                                       pl.len().alias("n"), pl.col("done").all())
             .filter(~pl.col("done")).sort("last"))
    cost, n = np.cumsum(trajs["cost"].to_numpy()), np.cumsum(trajs["n"].to_numpy())
    i = 0
    while i < trajs.height:
        before_cost, before_n = (cost[i - 1], n[i - 1]) if i else (0, 0)
        j = min(np.searchsorted(cost, before_cost + budget(int(cost[-1] - before_cost)), side="right"),
                np.searchsorted(n, before_n + MAX_CHUNK_STEPS, side="right"))
        j = max(int(j), i + 1)
        yield np.sort(trajs[ROW].slice(i, j - i).explode().to_numpy())
        i = j


def read_rows(files: InputFiles, columns: list[str], rows: np.ndarray) -> pa.Table:
    """Some rows (ascending) of the input: only the row groups of its files that hold them are read."""
    starts = np.asarray(files.starts)
    which = np.searchsorted(starts, rows, side="right") - 1
    return pa.concat_tables([_read_file_rows(files.files[i], columns, rows[which == i] - starts[i])
                             for i in np.unique(which)], promote_options="permissive")


def _read_file_rows(path: Path, columns: list[str], rows: np.ndarray) -> pa.Table:
    """Some rows (ascending) of one Parquet file, reading only the row groups that hold them."""
    parquet = open_parquet(path)
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    ends = np.cumsum(sizes)
    groups = np.unique(np.searchsorted(ends, rows, side="right"))
    table = parquet.read_row_groups(groups.tolist(), columns=columns)
    first = np.concatenate([[0], ends])[groups]  # file row of each read group's start
    offset = np.cumsum(np.concatenate([[0], np.asarray(sizes)[groups][:-1]]))  # its start in `table`
    group = np.searchsorted(groups, np.searchsorted(ends, rows, side="right"))
    return table.take(pa.array(rows - first[group] + offset[group]))


def stream_rows(rollouts: Rollouts, columns: list[str], chunks: Iterator[np.ndarray], skip: np.ndarray,
                rows_per_chunk: int) -> Iterator[tuple[np.ndarray, pa.Table]]:
    """(rows, table) of each chunk in one pass over the file: rows read before their chunk comes wait in memory
    (rows marked in `skip` are dropped as read)."""
    reader = rollouts.chunks(columns, rows_per_chunk)
    buffer = pa.schema([rollouts.schema.field(c) for c in columns]).empty_table()
    buffered = np.zeros(0, dtype=np.int64)
    read = 0
    for rows in chunks:
        while read <= rows[-1]:
            offset, table = next(reader)
            read = offset + table.num_rows
            keep = ~skip[offset:read]
            buffer = pa.concat_tables([buffer, table.filter(pa.array(keep))]).combine_chunks()
            buffered = np.concatenate([buffered, np.arange(offset, read)[keep]])
        at = np.searchsorted(buffered, rows)
        left = np.ones(len(buffered), dtype=bool)
        left[at] = False
        yield rows, buffer.take(pa.array(at))
        buffer, buffered = buffer.filter(pa.array(left)), buffered[left]


class Checkpoints:
    """Loads the checkpoint each chunk needs, keeping one in memory."""

    def __init__(self, cfg: ScoreConfig, note: Callable[[str], None] = lambda message: None) -> None:
        from .scoring import resolve_device, resolve_dtype  # torch is imported only when a model is needed
        self.cfg, self.note = cfg, note
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.current: Policy | None = None
        self.load_seconds = 0.0
        """Time spent loading checkpoints, which chunk sizing leaves out."""

    def get(self, ref: str) -> Policy:
        from .scoring import load_policy
        if self.current is None or self.current.ref != ref:
            self.note(f"loading {ref}")
            started = time.perf_counter()
            self.current = None  # free the previous weights before loading the next
            self.current = load_policy(ref, device=self.device, dtype=self.dtype, allow_pickle=self.cfg.allow_pickle,
                                       trust_remote_code=self.cfg.trust_remote_code)
            seconds = time.perf_counter() - started
            self.load_seconds += seconds
            self.note(f"loaded {ref} in {seconds:.1f} s")
        return self.current


def _check_logged_lengths(path: Path, table: pa.Table, responses: TokenRows, rows: np.ndarray) -> None:
    """Logged token_entropy must have one entry per response token as the model tokenises it."""
    if "token_entropy" not in table.column_names:
        return
    logged = pc.list_value_length(table.column("token_entropy")).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~np.isnan(logged.astype(float)) & (logged != responses.lengths))
    if bad.size:
        i = bad[0]
        raise BadInput(path, f"has {int(logged[i])} entropies for {responses.lengths[i]} response tokens",
                       column="token_entropy", row=int(rows[i]))


def score_chunk(keys: pl.DataFrame, table: pa.Table, source: Source, refs: dict[int, str], checkpoints: Checkpoints,
                cfg: ScoreConfig, on_batch: Callable[[int, int], None] | None = None) -> pa.Table:
    """Rescore a chunk of whole trajectories (`keys`: KEY_COLUMNS, `table`: their content, same rows) with each
    iteration's checkpoint; one result row per step, in `keys` order."""
    import torch

    from .scoring import score_units
    from .stats import TokenStats
    n = keys.height
    keys = keys.with_columns(pl.int_range(pl.len()).alias("_local"))
    token_local, scored = [], []
    truncated, shared = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    weights = np.full(n, None, dtype=object)
    for ref in dict.fromkeys(refs[it] for it in keys["iteration"].unique(maintain_order=True)):
        policy = checkpoints.get(ref)
        subset = keys.filter(pl.col("iteration").is_in([it for it, r in refs.items() if r == ref]))
        local, rows = subset["_local"].to_numpy(), subset[ROW].to_numpy()
        part = table.take(pa.array(local))
        prompts = token_rows(part, source.input_column, policy.tokenizer, source.path)
        responses = token_rows(part, source.output_column, policy.tokenizer, source.path)
        outside = Problems(source.path)
        check_vocabulary(prompts, policy.vocab_size, outside, source.input_column, rows)
        check_vocabulary(responses, policy.vocab_size, outside, source.output_column, rows)
        outside.raise_if_any()
        _check_logged_lengths(source.path, part, responses, rows)
        trajectories = (subset.with_columns(pl.int_range(pl.len()).alias("_at")).sort([*TRAJ_KEYS, "step"])
                        .group_by(TRAJ_KEYS, maintain_order=True).agg("_at")["_at"].to_list())
        units, _ = plan_units([np.asarray(t) for t in trajectories], prompts, responses, max_len=policy.max_len,
                              truncate_left=cfg.truncate_prompt == "left", share_prefix=cfg.prefix_sharing,
                              path=source.path, row_ids=rows)
        for u in units:
            shared[local[u.rows]] = len(u.rows) > 1
            truncated[local[u.rows]] = u.starts < prompts.lengths[u.rows]  # fewer prompt tokens than given
        weights[local] = policy.weights_sha256
        scored.append(score_units(policy, units, temperature=cfg.temperature, batch_tokens=cfg.batch_tokens,
                                  on_batch=on_batch))
        token_local.append(np.repeat(local[np.concatenate([u.rows for u in units])],
                                     np.concatenate([u.lengths for u in units])))
    row = np.concatenate(token_local)
    tokens = TokenStats(*(torch.cat(column).double() for column in zip(*scored)))  # every response token, float64
    count = np.bincount(row, minlength=n)

    def total(x: torch.Tensor) -> np.ndarray:  # per-step sum over the step's tokens
        return np.bincount(row, weights=x.numpy(), minlength=n)

    columns = {ROW: pa.array(keys[ROW].to_numpy(), pa.int64()), "n_response_tokens": pa.array(count, pa.int32()),
               "step_entropy": total(tokens.entropy) / count, "step_renyi2": total(tokens.renyi2) / count,
               "step_logprob": total(tokens.logprob), "step_grad_norm_sq": total(tokens.grad_norm_sq) / count,
               "step_grad_norm_sq_expected": total(tokens.grad_norm_sq_expected) / count}
    if cfg.token_level:  # tokens of a step are contiguous and in order: a stable sort by step groups them
        order = np.argsort(row, kind="stable")
        offsets = pa.array(np.concatenate([[0], np.cumsum(count)]), pa.int32())
        for name, values in (("token_entropy", tokens.entropy), ("token_logprob", tokens.logprob)):
            columns[name] = pa.ListArray.from_arrays(offsets, pa.array(values.numpy()[order].astype(np.float32)))
    columns.update(_truncated=truncated, _shared=shared, _weights=pa.array(weights, pa.string()),
                   _device=pa.array([str(checkpoints.device)] * n, pa.string()),
                   _dtype=pa.array([str(checkpoints.dtype).removeprefix("torch.")] * n, pa.string()))
    return pa.table(columns)
