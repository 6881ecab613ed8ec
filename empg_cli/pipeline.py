"""The two file-to-file jobs: `score_file` (rescore + advantages) and `advantages_file` (advantages only)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from . import __version__
from .advantages import ADVANTAGE_COLUMNS, compute_advantages
from .config import AdvantageConfig, ScoreConfig, advantage_config_from, config_to_dict
from .errors import BadInput, BadUsage
from .rollouts import (ROW, TRAJ_KEYS, Rollouts, check_output_path, read_metadata, read_rollouts, read_table,
                       sha256_file, write_table_atomic)
from .schema import SCHEMA_VERSION
from .scoring import load_policy, resolve_device, resolve_dtype, score_units
from .sequences import TokenRows, check_vocabulary, plan_units, token_rows

STEP_COLUMNS = ["n_response_tokens", "step_entropy", "step_renyi2", "step_logprob", "step_grad_norm_sq",
                "step_grad_norm_sq_expected"]


@dataclass
class Progress:
    """Callbacks a front end may pass to follow long work; the library itself never prints."""

    start: Callable[[int], None] = lambda total_tokens: None
    advance: Callable[[int], None] = lambda tokens: None
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


def _logged_statistics(rollouts: Rollouts) -> tuple[dict[str, np.ndarray], None]:
    """Step entropy as the mean of the logged `token_entropy`; the model-only columns stay null."""
    logged = rollouts.table.column("token_entropy")
    values = pc.list_flatten(logged).to_numpy(zero_copy_only=False).astype(np.float64)
    lengths = pc.list_value_length(logged).to_numpy(zero_copy_only=False).astype(np.int64)
    missing = np.full(len(lengths), np.nan)
    arrays = {c: missing for c in STEP_COLUMNS[2:]}
    arrays["n_response_tokens"] = lengths.astype(np.int32)
    arrays["step_entropy"] = np.add.reduceat(values, np.concatenate([[0], np.cumsum(lengths)[:-1]])) / lengths
    return arrays, None


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


def _model_statistics(rollouts: Rollouts, cfg: ScoreConfig, progress: Progress
                      ) -> tuple[dict[str, np.ndarray], TokenLists | None, dict[str, Any]]:
    """Rescore every step with its iteration's checkpoint: step arrays, per-token lists, model provenance."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    n = rollouts.table.num_rows
    refs = _model_refs(rollouts, cfg)
    info: dict[str, Any] = {"ref": cfg.model or rollouts.metadata["model"]["ref"], "checkpoints": {},
                            "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                            "truncated_prompts": 0, "prefix_shared_trajectories": 0}
    token_row, entropy, sum_p2, logprob = [], [], [], []
    for ref in dict.fromkeys(refs.values()):
        iterations = [it for it, r in refs.items() if r == ref]
        progress.note(f"loading {ref}")
        policy = load_policy(ref, device=device, dtype=dtype, allow_pickle=cfg.allow_pickle,
                             trust_remote_code=cfg.trust_remote_code)
        info["checkpoints"][ref] = {"iterations": iterations, "weights_sha256": policy.weights_sha256}
        subset = rollouts.steps.filter(pl.col("iteration").is_in(iterations))
        rows = subset[ROW].to_numpy()
        table = rollouts.table.take(rows)
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
        progress.start(int(sum(len(u.tokens) for u in units)))
        stats = score_units(policy, units, temperature=cfg.temperature, batch_tokens=cfg.batch_tokens,
                            on_tokens=progress.advance)
        token_row.append(np.repeat(rows[np.concatenate([u.rows for u in units])],
                                   np.concatenate([u.lengths for u in units])))
        entropy.append(stats.entropy.double().numpy())
        sum_p2.append(stats.sum_p2.double().numpy())
        logprob.append(stats.logprob.double().numpy())
    row = np.concatenate(token_row)
    ent, p2, lp = np.concatenate(entropy), np.concatenate(sum_p2), np.concatenate(logprob)
    count = np.bincount(row, minlength=n)
    mean = lambda x: np.bincount(row, weights=x, minlength=n) / count  # noqa: E731 - per-step mean over tokens
    arrays = {"n_response_tokens": count.astype(np.int32), "step_entropy": mean(ent),
              "step_renyi2": mean(-np.log(p2)), "step_logprob": np.bincount(row, weights=lp, minlength=n),
              "step_grad_norm_sq": mean(1 - 2 * np.exp(lp) + p2), "step_grad_norm_sq_expected": mean(1 - p2)}
    lists = None
    if cfg.token_level:  # tokens of a row are contiguous and in order: a stable sort by row groups them
        order = np.argsort(row, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int32)
        lists = TokenLists(offsets, ent[order].astype(np.float32), lp[order].astype(np.float32))
    return arrays, lists, info


@dataclass(frozen=True)
class TokenLists:
    """Per-token entropy and log-prob of every row, as list offsets and flat values."""

    offsets: np.ndarray
    entropy: np.ndarray
    logprob: np.ndarray


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


def _with_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """Set columns: replace those already present in place, append the others in the given order."""
    for name, array in columns.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    return table


def _advantage_arrays(steps: pl.DataFrame, cfg: AdvantageConfig, n_tokens: np.ndarray,
                      token_level: bool) -> dict[str, pa.Array]:
    adv = compute_advantages(steps, cfg)
    columns = {c: adv[c].to_arrow() for c in ADVANTAGE_COLUMNS}
    if token_level:
        counts = pl.Series(n_tokens.astype(np.int64))
        for name in ("empg", "aem"):
            columns[f"token_adv_{name}"] = (adv[f"adv_{name}"].cast(pl.Float32).repeat_by(counts)
                                           .cast(pl.List(pl.Float32)).to_arrow())
    return columns


def _summary(output: Path, steps: pl.DataFrame, adv_reward: pl.Series, entropy: pl.Series) -> Summary:
    trajs = steps.with_columns(traj_reward=adv_reward).unique(TRAJ_KEYS)
    return Summary(output, steps.height, trajs.height, steps.select(["run", "iteration", "group_id"]).n_unique(),
                   steps["iteration"].n_unique(), float((trajs["traj_reward"] > 0).mean()), float(entropy.mean()))


def _metadata(rollouts: Rollouts, score: ScoreConfig | None, advantages: AdvantageConfig,
              previous: dict[str, Any] | None, model: dict[str, Any] | None) -> dict[str, Any]:
    base = dict(previous or {})
    base.update({"schema_version": SCHEMA_VERSION, "tool": "empg", "tool_version": __version__,
                 "input_sha256": sha256_file(rollouts.path), "input": rollouts.path.name,
                 "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "advantages": config_to_dict(advantages), "estimator": advantages.estimator})
    if score is not None:
        base.update({"score": config_to_dict(score), "entropy_source": score.entropy_source,
                     "temperature": score.temperature, "model": model})
    return base


def score_file(input_path: Path, output_path: Path, score: ScoreConfig, advantages: AdvantageConfig, *,
               overwrite: bool = False, progress: Progress | None = None) -> Summary:
    """Validate, rescore (or take logged entropies), compute advantages, write the scored table (SPEC 4)."""
    progress = progress or Progress()
    check_output_path(input_path, output_path, overwrite)
    started = time.perf_counter()
    rollouts = read_rollouts(input_path, advantages, entropy_source=score.entropy_source)
    if score.temperature is None:
        score = replace(score, temperature=float((rollouts.metadata or {}).get("temperature", 1.0)))
    model_info = None
    if score.entropy_source == "logged":
        arrays, lists = _logged_statistics(rollouts)
    else:
        arrays, lists, model_info = _model_statistics(rollouts, score, progress)
    steps = rollouts.steps.with_columns(step_entropy=pl.Series(arrays["step_entropy"]))
    columns: dict[str, pa.Array] = {"n_response_tokens": pa.array(arrays["n_response_tokens"], pa.int32())}
    for name in STEP_COLUMNS[1:]:
        values = arrays[name]
        columns[name] = pa.array(values, pa.float64(), mask=np.isnan(values)) if name != "step_entropy" \
            else pa.array(values, pa.float64())
    columns.update(_advantage_arrays(steps, advantages, arrays["n_response_tokens"], score.token_level))
    if score.token_level:
        columns = _token_columns(rollouts, lists) | columns
    table = _with_columns(rollouts.table, columns)
    write_table_atomic(table, output_path, _metadata(rollouts, score, advantages, None, model_info))
    summary = _summary(output_path, steps, pl.from_arrow(columns["traj_reward"]), steps["step_entropy"])
    summary.seconds = time.perf_counter() - started
    if model_info:
        summary.tokens_scored = int(sum(arrays["n_response_tokens"]))
        summary.device, summary.dtype = model_info["device"], model_info["dtype"]
    return summary


def _token_columns(rollouts: Rollouts, lists: TokenLists | None) -> dict[str, pa.Array]:
    """token_entropy (unless the input has it) and token_logprob, one list per row (null from logs)."""
    if lists is None:
        return {"token_logprob": pa.nulls(rollouts.table.num_rows, pa.list_(pa.float32()))}
    columns = {}
    if "token_entropy" not in rollouts.table.column_names:
        columns["token_entropy"] = pa.ListArray.from_arrays(lists.offsets, lists.entropy)
    columns["token_logprob"] = pa.ListArray.from_arrays(lists.offsets, lists.logprob)
    return columns


def advantages_file(input_path: Path, output_path: Path, overrides: dict[str, Any], *,
                    overwrite: bool = False) -> Summary:
    """Recompute the advantage columns of a scored file (no model); unset flags keep the file's own values."""
    check_output_path(input_path, output_path, overwrite)
    stored = (read_metadata(read_table(input_path)) or {}).get("advantages")
    advantages = advantage_config_from(stored, **overrides)
    rollouts = read_rollouts(input_path, advantages, scored=True)
    steps = rollouts.steps.with_columns(step_entropy=pl.from_arrow(rollouts.table.column("step_entropy")))
    n_tokens = rollouts.table.column("n_response_tokens").to_numpy()
    token_level = "token_adv_empg" in rollouts.table.column_names
    columns = _advantage_arrays(steps, advantages, n_tokens, token_level)
    table = _with_columns(rollouts.table, columns)
    write_table_atomic(table, output_path, _metadata(rollouts, None, advantages, rollouts.metadata, None))
    return _summary(output_path, steps, pl.from_arrow(columns["traj_reward"]), steps["step_entropy"])
