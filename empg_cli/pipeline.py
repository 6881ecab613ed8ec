"""The two file-to-file jobs: `score_file` (rescore + advantages) and `advantages_file` (advantages only).

Both stream the file: only the key columns and per-step results live in memory, the prompts and responses are
read, scored and written back one chunk of rows at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from . import __version__
from .advantages import ADVANTAGE_COLUMNS, advantage_table
from .chunk import STEP_COLUMNS, Source, row_costs
from .config import AdvantageConfig, RunConfig, ScoreConfig, advantage_config_from, config_to_dict
from .errors import BadUsage, EmpgError
from .ingest.convert import TEXT_WARNING
from .output import atomic_output, sidecar, write_parquet
from .progress import Progress
from .rollouts import (ROWS_PER_CHUNK, Rollouts, open_rollouts, open_source, read_columns, read_metadata,
                       with_columns)
from .schema import GROUP_KEYS, SCHEMA_VERSION, TRAJ_KEYS
from .validation import ROW
from .work import WorkFolder, work_key

MODEL_COLUMNS = ["step_renyi2", "step_logprob", "step_grad_norm_sq", "step_grad_norm_sq_expected"]


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
    resumed_steps: int = 0
    """Steps whose results a killed run had committed."""
    device: str | None = None
    dtype: str | None = None
    warnings: list[str] = field(default_factory=list)
    """Things the user should know about the result (the library never prints; the CLI shows them)."""


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
                           f"{rollouts.source} names none in its empg metadata")
        template = _model_from_metadata(template, rollouts.source)
    iterations = rollouts.steps["iteration"].unique().sort().to_list()
    return {it: template.replace("{iteration}", str(it)) for it in iterations}


def _model_from_metadata(ref: str, source) -> str:
    """A model named by the input's metadata is data, not authority: a relative path inside the file's folder, or a
    hub id already in the local Hugging Face cache (never a download); anything else asks for --model."""
    folder = source.folder.resolve()
    local = folder / ref
    inside = not Path(ref).is_absolute() and local.resolve().is_relative_to(folder)
    if inside and ("{iteration}" in ref or local.exists()):
        return str(local)
    if not Path(ref).is_absolute() and ref.count("/") == 1 and not ref.startswith(".") and "{" not in ref:
        from huggingface_hub import try_to_load_from_cache
        if isinstance(try_to_load_from_cache(ref, "config.json"), str):
            return ref
        raise BadUsage(f"{source}'s empg metadata names the hub model '{ref}', which is not in the local Hugging Face "
                       f"cache; empg downloads nothing it was not asked for: pass --model {ref}")
    raise BadUsage(f"{source}'s empg metadata names the model '{ref}', which is not a folder inside the file's own "
                   f"folder; pass --model to choose the checkpoint")


def _settings(rollouts: Rollouts, cfg: ScoreConfig, refs: dict[int, str], input_sha256: str) -> dict[str, Any]:
    """Everything that changes the statistics, for the work folder's key. The batch size does not (a run that ran out
    of memory resumes with a smaller one); each local checkpoint's weight files are named with their size and time."""
    def files(ref: str) -> list[tuple[str, int, int]] | None:
        folder = Path(ref)
        if not folder.is_dir():
            return None
        return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir())
                if f.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    return {"input_sha256": input_sha256, "columns": [rollouts.input_column, rollouts.output_column],
            "score": {k: v for k, v in config_to_dict(cfg).items() if k != "batch_tokens"},
            "checkpoints": {ref: files(ref) for ref in sorted(set(refs.values()))}}


def _model_statistics(rollouts: Rollouts, cfg: ScoreConfig, refs: dict[int, str], progress: Progress,
                      work: WorkFolder, run: RunConfig, rows_per_chunk: int,
                      ) -> tuple[pa.Table, dict[str, Any], np.ndarray]:
    """Rescore the steps not yet in the work folder on the chosen engine: all steps' results (in row order, from the
    committed parts), model provenance, and which steps were resumed."""
    from .engines import Job
    n = rollouts.steps.height
    done = np.zeros(n, dtype=bool)
    for part in work.committed():
        done[part.column(ROW).to_numpy()] = True
    progress.start(n, int(done.sum()))
    job = Job(Source.of(rollouts), refs, cfg, rollouts.steps, row_costs(rollouts, rows_per_chunk), done)
    if run.engine == "ray":
        from .engines.ray import run_ray
        run_ray(job, work, progress, workers=run.workers, address=run.ray_address, chunk_tokens=run.chunk_tokens)
    else:
        from .engines.local import run_local
        run_local(job, rollouts, work, progress, chunk_tokens=run.chunk_tokens, rows_per_chunk=rows_per_chunk)
    results = pa.concat_tables(work.committed())
    rows = results.column(ROW).to_numpy()
    if len(rows) != n or not np.array_equal(np.sort(rows), np.arange(n)):
        raise RuntimeError(f"the work folder {work.path} holds results for {len(np.unique(rows))} of {n} steps")
    results = results.take(pa.array(np.argsort(rows)))
    steps = rollouts.steps.with_columns(pl.from_arrow(results.select(["_truncated", "_shared", "_weights"])))
    checkpoints = {}
    for ref in dict.fromkeys(refs.values()):
        scored = steps.filter(pl.col("iteration").is_in([it for it, r in refs.items() if r == ref]))
        checkpoints[ref] = {"iterations": scored["iteration"].unique().sort().to_list(),
                            "weights_sha256": scored["_weights"].drop_nulls().first()}
    device, dtype = (",".join(sorted(set(results.column(c).to_pylist()))) for c in ("_device", "_dtype"))
    info = {"ref": cfg.model or rollouts.metadata["model"]["ref"], "device": device, "dtype": dtype,
            "truncated_prompts": int(steps["_truncated"].sum()),
            "prefix_shared_trajectories": steps.filter("_shared").select(TRAJ_KEYS).n_unique(),
            "checkpoints": checkpoints}
    return results, info, done


def _step_columns(arrays: dict[str, np.ndarray]) -> dict[str, pa.Array]:
    columns = {"n_response_tokens": pa.array(arrays["n_response_tokens"], pa.int32()),
               "step_entropy": pa.array(arrays["step_entropy"], pa.float64())}
    for name in MODEL_COLUMNS:
        columns[name] = pa.array(arrays[name], pa.float64(), mask=np.isnan(arrays[name]))
    return columns


def _token_columns(rollouts: Rollouts, results: pa.Table | None) -> dict[str, pa.ChunkedArray]:
    """token_entropy (unless the input has it) and token_logprob, one list per row (null from logs)."""
    if results is None:
        return {"token_logprob": pa.chunked_array([pa.nulls(rollouts.steps.height, pa.list_(pa.float32()))])}
    names = ["token_logprob"] if "token_entropy" in rollouts.schema.names else ["token_entropy", "token_logprob"]
    return {name: results.column(name) for name in names}


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
              model: dict[str, Any] | None, input_sha256: str | None = None) -> dict[str, Any]:
    """The `empg` provenance: an `advantages` run keeps what the scoring run recorded and updates the rest."""
    stored = rollouts.metadata or {}
    base = dict(stored) if score is None else {k: stored[k] for k in ("source", "fidelity") if k in stored}
    base.update({"schema_version": SCHEMA_VERSION, "tool": "empg", "tool_version": __version__,
                 "input_sha256": input_sha256 or rollouts.source.sha256(), "input": Path(rollouts.source.name).name,
                 "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "advantages": config_to_dict(advantages), "estimator": advantages.estimator})
    if score is not None:
        base.update({"score": config_to_dict(score), "entropy_source": score.entropy_source,
                     "temperature": score.temperature, "model": model,
                     "device": model["device"] if model else None, "dtype": model["dtype"] if model else None})
    return base


def score_file(input_path: Path, output_path: Path, score: ScoreConfig, advantages: AdvantageConfig, *,
               overwrite: bool = False, progress: Progress | None = None, engine: str = "local",
               workers: int | None = None, ray_address: str | None = None, resume: bool = True,
               rows_per_chunk: int = ROWS_PER_CHUNK, chunk_tokens: int | None = None) -> Summary:
    """Validate, rescore (or take logged entropies), compute advantages, write the scored table (docs/cli.md).

    Rescoring runs on `engine` (local, or ray with `workers` actors on the cluster at `ray_address`) and commits
    finished chunks to a work folder beside the output; with `resume`, a rerun with the same input and settings
    continues from them. `chunk_tokens` fixes the chunk size (default: about 10 s of compute per chunk).
    """
    progress = progress or Progress()
    run = RunConfig(engine=engine, workers=workers, ray_address=ray_address, resume=resume, chunk_tokens=chunk_tokens)
    with atomic_output(output_path, overwrite=overwrite, inputs=[input_path]) as temp:
        if run.engine == "ray" and score.entropy_source == "model":
            from .engines.ray import import_ray
            import_ray()  # not installed: bad usage, found before any work
        started = time.perf_counter()
        rollouts = open_rollouts(input_path, advantages, entropy_source=score.entropy_source)
        if score.temperature is None:
            score = replace(score, temperature=float((rollouts.metadata or {}).get("temperature", 1.0)))
        input_sha256 = rollouts.source.sha256()
        model_info, results, work, resumed = None, None, None, None
        if score.entropy_source == "logged":
            arrays = _logged_statistics(rollouts, rows_per_chunk)
        else:
            refs = _model_refs(rollouts, score)
            # the work folder is ours while atomic_output holds the output's lock
            work = WorkFolder(sidecar(output_path, "work"), work_key(_settings(rollouts, score, refs, input_sha256)),
                              resume=run.resume)
            try:
                results, model_info, resumed = _model_statistics(rollouts, score, refs, progress, work, run,
                                                                 rows_per_chunk)
            except EmpgError:  # bad input or model: fixing it changes the key, so nothing here could be resumed
                work.remove()
                raise
            arrays = {c: results.column(c).to_numpy() for c in STEP_COLUMNS}
        steps = rollouts.steps.with_columns(step_entropy=pl.Series(arrays["step_entropy"]))
        columns = _step_columns(arrays)
        columns.update(_advantage_columns(steps, advantages, arrays["n_response_tokens"], score.token_level))
        if score.token_level:
            columns = _token_columns(rollouts, results) | columns
        write_parquet(temp, with_columns(rollouts, columns,
                                         _metadata(rollouts, score, advantages, model_info, input_sha256),
                                         rows_per_chunk))
    if work is not None:
        work.remove()
    summary = _summary(output_path, steps, columns["traj_reward"], arrays["step_entropy"])
    summary.seconds = time.perf_counter() - started
    if (rollouts.metadata or {}).get("fidelity") == "text" and score.entropy_source == "model":
        summary.warnings.append(TEXT_WARNING.format(path=input_path))
    if model_info:
        summary.resumed_steps = int(resumed.sum())
        summary.tokens_scored = int(arrays["n_response_tokens"][~resumed].sum())
        summary.device, summary.dtype = model_info["device"], model_info["dtype"]
    return summary


def advantages_file(input_path: Path, output_path: Path, overrides: dict[str, Any], *,
                    overwrite: bool = False) -> Summary:
    """Recompute the advantage columns of a scored file (no model); unset flags keep the file's own values."""
    with atomic_output(output_path, overwrite=overwrite, inputs=[input_path]) as temp:
        stored = (read_metadata(open_source(input_path)[1]) or {}).get("advantages")
        advantages = advantage_config_from(stored, **overrides)
        rollouts = open_rollouts(input_path, advantages, scored=True, content=False)
        stats = read_columns(rollouts.source, rollouts.schema, ["step_entropy", "n_response_tokens"])
        entropy = stats.column("step_entropy").to_numpy()
        steps = rollouts.steps.with_columns(step_entropy=pl.Series(entropy))
        columns = _advantage_columns(steps, advantages, stats.column("n_response_tokens").to_numpy(),
                                     "token_adv_empg" in rollouts.schema.names)
        write_parquet(temp, with_columns(rollouts, columns, _metadata(rollouts, None, advantages, None)))
    return _summary(output_path, steps, columns["traj_reward"], entropy)
