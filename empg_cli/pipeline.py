"""The two file-to-file jobs: `score_file` (rescore + advantages) and `advantages_file` (advantages only).

Both stream the file: only the key columns and per-step results live in memory, the prompts and responses are
read, scored and written back one chunk of rows at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from . import __version__
from .advantages import ADVANTAGE_COLUMNS, advantage_table
from .config import AdvantageConfig, ScoreConfig, advantage_config_from, config_to_dict
from .errors import BadInput, BadUsage
from .ingest.convert import TEXT_WARNING
from .output import atomic_output, write_parquet
from .rollouts import (ROWS_PER_CHUNK, Rollouts, open_parquet, open_rollouts, read_metadata, read_table, sha256_file,
                       with_columns)
from .schema import GROUP_KEYS, SCHEMA_VERSION, TRAJ_KEYS
from .sequences import TokenRows, check_vocabulary, plan_units, token_rows
from .validation import ROW

if TYPE_CHECKING:
    from .scoring import Policy

MODEL_COLUMNS = ["step_renyi2", "step_logprob", "step_grad_norm_sq", "step_grad_norm_sq_expected"]


@dataclass
class Progress:
    """Callbacks a front end may pass to follow long work; the library itself never prints."""

    start: Callable[[int], None] = lambda total_steps: None
    advance: Callable[[int, int], None] = lambda steps, tokens: None
    note: Callable[[str], None] = lambda message: None


@dataclass
class Summary:
    """What a job did, for the closing summary."""

    output: Path
    rows: int
    trajectories: int
    groups: int
    iterations: int
    success_rate: float
    mean_step_entropy: float
    tokens_scored: int = 0
    seconds: float = 0.0
    device: str | None = None
    dtype: str | None = None
    warnings: list[str] = field(default_factory=list)
    """Things the user should know about the result (the library never prints; the CLI shows them)."""


@dataclass(frozen=True)
class TokenLists:
    """Per-token entropy and log-prob of every row, as list offsets and flat values."""

    offsets: np.ndarray
    entropy: np.ndarray
    logprob: np.ndarray


def _logged_statistics(rollouts: Rollouts, rows_per_chunk: int) -> dict[str, np.ndarray]:
    """Step entropy as the mean of the logged `token_entropy`; the model-only columns stay null."""
    n = rollouts.steps.height
    arrays = {c: np.full(n, np.nan) for c in MODEL_COLUMNS}
    arrays["n_response_tokens"] = np.zeros(n, dtype=np.int32)
    arrays["step_entropy"] = np.zeros(n)
    for offset, chunk in rollouts.chunks(["token_entropy"], rows_per_chunk):
        logged = chunk.column("token_entropy")
        values = pc.list_flatten(logged).to_numpy(zero_copy_only=False).astype(np.float64)
        lengths = pc.list_value_length(logged).to_numpy(zero_copy_only=False).astype(np.int64)
        rows = slice(offset, offset + chunk.num_rows)
        arrays["n_response_tokens"][rows] = lengths
        arrays["step_entropy"][rows] = np.add.reduceat(values, np.cumsum(lengths) - lengths) / lengths
    return arrays


def _model_refs(rollouts: Rollouts, cfg: ScoreConfig) -> dict[int, str]:
    """The checkpoint of each iteration: --model, else the input's metadata (relative to the file's folder)."""
    template = cfg.model
    if template is None:
        template = ((rollouts.metadata or {}).get("model") or {}).get("ref")
        if template is None:
            raise BadUsage(f"no model: pass --model (a folder, a hub id, or a template with {{iteration}}); "
                           f"{rollouts.path} names none in its empg metadata")
        if not Path(template).is_absolute() and not Path(template).exists():
            candidate = rollouts.path.parent / template
            if "{iteration}" in template or candidate.exists():
                template = str(candidate)
    iterations = rollouts.steps["iteration"].unique().sort().to_list()
    return {it: template.replace("{iteration}", str(it)) for it in iterations}


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


def _empty_table(rollouts: Rollouts, columns: list[str]) -> pa.Table:
    """An empty table with the file's types for `columns`."""
    return pa.schema([rollouts.schema.field(c) for c in columns]).empty_table()


class _Checkpoints:
    """Loads the checkpoint each chunk needs, keeping one in memory, and records their provenance."""

    def __init__(self, cfg: ScoreConfig, progress: Progress) -> None:
        from .scoring import resolve_device, resolve_dtype  # torch is imported only when a model is needed
        self.cfg, self.progress = cfg, progress
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.current: Policy | None = None
        self.provenance: dict[str, dict[str, Any]] = {}

    def get(self, ref: str, iterations: list[int]) -> Policy:
        from .scoring import load_policy
        if self.current is None or self.current.ref != ref:
            self.progress.note(f"loading {ref}")
            self.current = None  # free the previous weights before loading the next
            self.current = load_policy(ref, device=self.device, dtype=self.dtype, allow_pickle=self.cfg.allow_pickle,
                                       trust_remote_code=self.cfg.trust_remote_code)
            self.progress.note("rescoring")
        seen = self.provenance.setdefault(ref, {"iterations": [], "weights_sha256": self.current.weights_sha256})
        seen["iterations"] = sorted(set(seen["iterations"]) | set(iterations))
        return self.current


def _model_statistics(rollouts: Rollouts, cfg: ScoreConfig, progress: Progress, rows_per_chunk: int,
                      ) -> tuple[dict[str, np.ndarray], TokenLists | None, dict[str, Any]]:
    """Rescore every step with its iteration's checkpoint: step arrays, per-token lists, model provenance."""
    import torch

    from .scoring import score_units
    from .stats import TokenStats
    n = rollouts.steps.height
    refs = _model_refs(rollouts, cfg)
    checkpoints = _Checkpoints(cfg, progress)
    info: dict[str, Any] = {"ref": cfg.model or rollouts.metadata["model"]["ref"], "device": str(checkpoints.device),
                            "dtype": str(checkpoints.dtype).removeprefix("torch."), "truncated_prompts": 0,
                            "prefix_shared_trajectories": 0}
    token_row, scored = [], []
    columns = [rollouts.input_column, rollouts.output_column] + ["token_entropy"] * ("token_entropy" in rollouts.schema.names)
    # a trajectory is scored once its last row has been read, whole: rows of unfinished ones wait for later chunks
    last_row = rollouts.steps.select(pl.col(ROW).max().over(TRAJ_KEYS))[ROW].to_numpy()
    waiting, waiting_rows = _empty_table(rollouts, columns), np.zeros(0, dtype=np.int64)
    progress.start(n)
    for offset, chunk in rollouts.chunks(columns, rows_per_chunk):
        chunk = pa.concat_tables([waiting, chunk])
        read = np.concatenate([waiting_rows, np.arange(offset, offset + chunk.num_rows - len(waiting_rows))])
        ready = last_row[read] < offset + chunk.num_rows - len(waiting_rows)
        waiting, waiting_rows = chunk.filter(pa.array(~ready)), read[~ready]
        chunk, read = chunk.filter(pa.array(ready)), read[ready]
        keys = rollouts.steps[read].with_columns(pl.int_range(pl.len()).alias("_chunk"))
        for ref in dict.fromkeys(refs[it] for it in keys["iteration"].unique(maintain_order=True)):
            iterations = [it for it, r in refs.items() if r == ref]
            policy = checkpoints.get(ref, sorted(set(iterations) & set(keys["iteration"].to_list())))
            subset = keys.filter(pl.col("iteration").is_in(iterations))
            rows = subset[ROW].to_numpy()
            table = chunk.take(subset["_chunk"].to_numpy())
            prompts = token_rows(table, rollouts.input_column, policy.tokenizer, rollouts.path)
            responses = token_rows(table, rollouts.output_column, policy.tokenizer, rollouts.path)
            check_vocabulary(prompts, policy.vocab_size, rollouts.path, rollouts.input_column, rows)
            check_vocabulary(responses, policy.vocab_size, rollouts.path, rollouts.output_column, rows)
            _check_logged_lengths(rollouts.path, table, responses, rows)
            trajectories = (subset.with_columns(pl.int_range(pl.len()).alias("_local")).sort([*TRAJ_KEYS, "step"])
                            .group_by(TRAJ_KEYS, maintain_order=True).agg("_local")["_local"].to_list())
            units, truncated = plan_units([np.asarray(t) for t in trajectories], prompts, responses,
                                          max_len=policy.max_len, truncate_left=cfg.truncate_prompt == "left",
                                          share_prefix=cfg.prefix_sharing, path=rollouts.path, row_ids=rows)
            info["truncated_prompts"] += truncated
            info["prefix_shared_trajectories"] += sum(len(u.rows) > 1 for u in units)
            stats = score_units(policy, units, temperature=cfg.temperature, batch_tokens=cfg.batch_tokens,
                                on_batch=progress.advance)
            token_row.append(np.repeat(rows[np.concatenate([u.rows for u in units])],
                                       np.concatenate([u.lengths for u in units])))
            scored.append(stats)
    info["checkpoints"] = checkpoints.provenance
    row = np.concatenate(token_row)
    tokens = TokenStats(*(torch.cat(column).double() for column in zip(*scored)))  # every response token, float64
    count = np.bincount(row, minlength=n)

    def total(x: torch.Tensor) -> np.ndarray:  # per-step sum over the step's tokens
        return np.bincount(row, weights=x.numpy(), minlength=n)

    arrays = {"n_response_tokens": count.astype(np.int32), "step_entropy": total(tokens.entropy) / count,
              "step_renyi2": total(tokens.renyi2) / count, "step_logprob": total(tokens.logprob),
              "step_grad_norm_sq": total(tokens.grad_norm_sq) / count,
              "step_grad_norm_sq_expected": total(tokens.grad_norm_sq_expected) / count}
    lists = None
    if cfg.token_level:  # tokens of a row are contiguous and in order: a stable sort by row groups them
        order = np.argsort(row, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
        lists = TokenLists(offsets, tokens.entropy.numpy()[order].astype(np.float32),
                           tokens.logprob.numpy()[order].astype(np.float32))
    return arrays, lists, info


def _step_columns(arrays: dict[str, np.ndarray]) -> dict[str, pa.Array]:
    columns = {"n_response_tokens": pa.array(arrays["n_response_tokens"], pa.int32()),
               "step_entropy": pa.array(arrays["step_entropy"], pa.float64())}
    for name in MODEL_COLUMNS:
        columns[name] = pa.array(arrays[name], pa.float64(), mask=np.isnan(arrays[name]))
    return columns


def _token_columns(rollouts: Rollouts, lists: TokenLists | None) -> dict[str, pa.Array]:
    """token_entropy (unless the input has it) and token_logprob, one list per row (null from logs)."""
    if lists is None:
        return {"token_logprob": pa.nulls(rollouts.steps.height, pa.list_(pa.float32()))}
    columns = {}
    if "token_entropy" not in rollouts.schema.names:
        columns["token_entropy"] = pa.LargeListArray.from_arrays(lists.offsets, lists.entropy).cast(
            pa.list_(pa.float32()))
    columns["token_logprob"] = pa.LargeListArray.from_arrays(lists.offsets, lists.logprob).cast(pa.list_(pa.float32()))
    return columns


def _advantage_columns(steps: pl.DataFrame, cfg: AdvantageConfig, n_tokens: np.ndarray,
                       token_level: bool) -> dict[str, pa.Array]:
    adv = advantage_table(steps, cfg)
    columns = {c: adv[c].to_arrow() for c in ADVANTAGE_COLUMNS}
    if token_level:
        counts = pl.Series(n_tokens.astype(np.int64))
        for name in ("empg", "aem"):
            columns[f"token_adv_{name}"] = (adv[f"adv_{name}"].cast(pl.Float32).repeat_by(counts).to_arrow()
                                            .cast(pa.list_(pa.float32())))
    return columns


def _summary(output: Path, steps: pl.DataFrame, traj_reward: pa.Array, step_entropy: np.ndarray) -> Summary:
    trajs = steps.with_columns(traj_reward=pl.from_arrow(traj_reward)).unique(TRAJ_KEYS)
    return Summary(output, steps.height, trajs.height, steps.select(GROUP_KEYS).n_unique(),
                   steps["iteration"].n_unique(), float((trajs["traj_reward"] > 0).mean()), float(step_entropy.mean()))


def _metadata(rollouts: Rollouts, score: ScoreConfig | None, advantages: AdvantageConfig,
              model: dict[str, Any] | None) -> dict[str, Any]:
    """The `empg` provenance: an `advantages` run keeps what the scoring run recorded and updates the rest."""
    stored = rollouts.metadata or {}
    base = dict(stored) if score is None else {k: stored[k] for k in ("source", "fidelity") if k in stored}
    base.update({"schema_version": SCHEMA_VERSION, "tool": "empg", "tool_version": __version__,
                 "input_sha256": sha256_file(rollouts.path), "input": rollouts.path.name,
                 "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "advantages": config_to_dict(advantages), "estimator": advantages.estimator})
    if score is not None:
        base.update({"score": config_to_dict(score), "entropy_source": score.entropy_source,
                     "temperature": score.temperature, "model": model,
                     "device": model["device"] if model else None, "dtype": model["dtype"] if model else None})
    return base


def score_file(input_path: Path, output_path: Path, score: ScoreConfig, advantages: AdvantageConfig, *,
               overwrite: bool = False, progress: Progress | None = None,
               rows_per_chunk: int = ROWS_PER_CHUNK) -> Summary:
    """Validate, rescore (or take logged entropies), compute advantages, write the scored table (docs/cli.md)."""
    progress = progress or Progress()
    with atomic_output(output_path, overwrite=overwrite, inputs=[input_path]) as temp:
        started = time.perf_counter()
        rollouts = open_rollouts(input_path, advantages, entropy_source=score.entropy_source)
        if score.temperature is None:
            score = replace(score, temperature=float((rollouts.metadata or {}).get("temperature", 1.0)))
        model_info, lists = None, None
        if score.entropy_source == "logged":
            arrays = _logged_statistics(rollouts, rows_per_chunk)
        else:
            arrays, lists, model_info = _model_statistics(rollouts, score, progress, rows_per_chunk)
        steps = rollouts.steps.with_columns(step_entropy=pl.Series(arrays["step_entropy"]))
        columns = _step_columns(arrays)
        columns.update(_advantage_columns(steps, advantages, arrays["n_response_tokens"], score.token_level))
        if score.token_level:
            columns = _token_columns(rollouts, lists) | columns
        write_parquet(temp, with_columns(rollouts, columns, _metadata(rollouts, score, advantages, model_info),
                                         rows_per_chunk))
    summary = _summary(output_path, steps, columns["traj_reward"], arrays["step_entropy"])
    summary.seconds = time.perf_counter() - started
    if (rollouts.metadata or {}).get("fidelity") == "text" and score.entropy_source == "model":
        summary.warnings.append(TEXT_WARNING.format(path=input_path))
    if model_info:
        summary.tokens_scored = int(arrays["n_response_tokens"].sum())
        summary.device, summary.dtype = model_info["device"], model_info["dtype"]
    return summary


def advantages_file(input_path: Path, output_path: Path, overrides: dict[str, Any], *,
                    overwrite: bool = False) -> Summary:
    """Recompute the advantage columns of a scored file (no model); unset flags keep the file's own values."""
    with atomic_output(output_path, overwrite=overwrite, inputs=[input_path]) as temp:
        stored = (read_metadata(open_parquet(input_path).schema_arrow) or {}).get("advantages")
        advantages = advantage_config_from(stored, **overrides)
        rollouts = open_rollouts(input_path, advantages, scored=True)
        stats = read_table(input_path, ["step_entropy", "n_response_tokens"])
        entropy = stats.column("step_entropy").to_numpy()
        steps = rollouts.steps.with_columns(step_entropy=pl.Series(entropy))
        columns = _advantage_columns(steps, advantages, stats.column("n_response_tokens").to_numpy(),
                                     "token_adv_empg" in rollouts.schema.names)
        write_parquet(temp, with_columns(rollouts, columns, _metadata(rollouts, None, advantages, None)))
    return _summary(output_path, steps, columns["traj_reward"], entropy)
