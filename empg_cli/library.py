"""The public library (docs/api.md): the CLI's work in memory, on polars frames, with its defaults, checks and errors.

`import empg_cli as empg` re-exports these functions. Each one composes the modules the CLI uses; errors are the
same `EmpgError`s with the same one-line messages, naming `frame` where the input is an in-memory frame.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator

import polars as pl

from .advantages import advantage_table
from .config import AdvantageConfig, ScoreConfig, advantage_config_from
from .errors import BadInput, BadUsage, EmpgError
from .schema import TRAJ_KEYS, check_column_types, check_key_columns
from .validation import Problems, check_step_entropy, check_token_entropy, checked_steps

FRAME = "frame"
"""How error messages name an in-memory frame (where they would name a file)."""
Source = str | Path | pl.DataFrame


def compute_advantages(frame: pl.DataFrame, *, estimator: str = "grpo", reward_agg: str = "equal", k: float = 1.0,
                       k_future: float = 1.0, zeta: float = 0.1, empg_norm: str = "mean", aem_tau: float = 1.0,
                       aem_min_range: float = 0.1, batch_key: Sequence[str] | str = ("run", "iteration"),
                       ) -> pl.DataFrame:
    """Base, EMPG and AEM advantages of a step frame, as `empg advantages` computes them (docs/method.md).

    `frame` has one row per agent step with group_id, traj_id, step, reward and step_entropy (or token_entropy,
    averaged per step); run and iteration default to "default" and 0; no text is needed. Returns `frame` with
    step_entropy (if it was computed) and the advantage columns appended (existing ones replaced in place), rows in
    the input order. Raises EmpgError (BadInput, BadUsage) with the CLI's message on bad input.
    """
    cfg = AdvantageConfig(estimator=estimator, reward_agg=reward_agg, k=k, k_future=k_future, zeta=zeta,
                          empg_norm=empg_norm, aem_tau=aem_tau, aem_min_range=aem_min_range,
                          batch_key=(batch_key,) if isinstance(batch_key, str) else tuple(batch_key))
    if not isinstance(frame, pl.DataFrame):
        raise BadUsage(f"compute_advantages takes a polars DataFrame; got {type(frame).__name__}")
    if frame.height == 0:
        raise BadInput(FRAME, "has no rows")
    check_column_types(frame.head(0).to_arrow().schema, FRAME, "scored")
    check_key_columns(frame.columns, FRAME)
    problems = Problems(FRAME)  # every problem of keys and entropies, in one error
    keys = [c for c in dict.fromkeys((*TRAJ_KEYS, "step", "reward", *cfg.batch_key, "advantage")) if c in frame.columns]
    steps, structure = checked_steps(frame.select(keys), FRAME, cfg, problems)
    entropy = _step_entropy(frame, problems)
    problems.raise_if_any()
    advantages = advantage_table(steps.with_columns(entropy), cfg, structure)
    computed = [] if "step_entropy" in frame.columns else [entropy]
    return frame.with_columns(*computed, *advantages)


def _step_entropy(frame: pl.DataFrame, problems: Problems) -> pl.Series:
    """H_t per row: the frame's step_entropy, else the mean of its logged token_entropy (nats), checked."""
    if "step_entropy" in frame.columns:
        entropy = frame["step_entropy"].cast(pl.Float64)
        check_step_entropy(entropy, problems)
    elif "token_entropy" in frame.columns:
        check_token_entropy(frame["token_entropy"].to_arrow(), 0, problems, required=True,
                            response_ids=frame["response_ids"].to_arrow() if "response_ids" in frame.columns else None)
        entropy = frame["token_entropy"].cast(pl.List(pl.Float64)).list.mean().alias("step_entropy")
    else:
        raise BadInput(FRAME, "needs the column 'step_entropy' (from `empg score`) or 'token_entropy' (per-token "
                              "entropies logged at generation time)")
    return entropy


def score(source: Source, *, model: str | None = None, temperature: float | None = None, device: str = "auto",
          dtype: str = "auto", entropy_source: str = "model", token_level: bool = False, batch_tokens: int = 8192,
          engine: str = "local", workers: int | None = None, ray_address: str | None = None,
          **hyperparameters: Any) -> pl.DataFrame:
    """The scored table of `empg score` for a rollouts frame, file, folder or glob, in memory (docs/api.md).

    `hyperparameters` are compute_advantages' keyword arguments; `engine`, `workers` and `ray_address` are
    `empg score`'s (local, or Ray actors). A frame is written to a temporary Parquet file and scored like one;
    nothing is written beside the source.
    """
    from .pipeline import score_file
    names = {f.name for f in fields(AdvantageConfig)}
    unknown = sorted(set(hyperparameters) - names)
    if unknown:
        raise BadUsage(f"unknown hyperparameter '{unknown[0]}'; the hyperparameters are {', '.join(sorted(names))}")
    if isinstance(hyperparameters.get("batch_key"), str):
        hyperparameters["batch_key"] = [hyperparameters["batch_key"]]
    advantages = advantage_config_from(None, **hyperparameters)
    cfg = ScoreConfig(model=model, device=device, dtype=dtype, temperature=temperature, entropy_source=entropy_source,
                      batch_tokens=batch_tokens, token_level=token_level)
    with _as_file(source) as (path, work):
        output = work / "scored.parquet"
        score_file(path, output, cfg, advantages, engine=engine, workers=workers, ray_address=ray_address)
        return pl.read_parquet(output)


def read_rollouts(source: str | Path) -> pl.DataFrame:
    """A rollouts file, folder or glob, validated as `empg validate` does, as one frame (every column)."""
    from .rollouts import open_rollouts, read_columns
    rollouts = open_rollouts(source, AdvantageConfig())
    return pl.from_arrow(read_columns(rollouts.source, rollouts.schema, rollouts.schema.names))


def load_scored(sources: str | Path | Sequence[str | Path]) -> pl.DataFrame:
    """One step frame from one or more scored files, as `empg plot` and `empg audit` read them (dynamics.load_scored)."""
    from .dynamics import load_scored as load
    return load([sources] if isinstance(sources, (str, Path)) else list(sources))


def audit(frame_or_path: Source, top: int = 5) -> dict[str, Any]:
    """The `empg.audit.v1` report (docs/audit.md) of a scored file or frame, as `empg audit --format json` prints it.

    A frame is audited with the default batch (run, iteration) and delta 0.1 (a file's metadata says which it used);
    one without gradient norms (entropies logged, or only compute_advantages' columns) has null correlations.
    """
    from .credit_report import build_audit
    from .dynamics import MODEL_COLUMNS
    if isinstance(frame_or_path, pl.DataFrame):
        frame_or_path = frame_or_path.with_columns(pl.lit(None, pl.Float64).alias(c) for c in MODEL_COLUMNS
                                                   if c not in frame_or_path.columns)
    with _as_file(frame_or_path) as (path, _):
        return build_audit(load_scored(path), top=top)


@contextmanager
def _as_file(source: Source) -> Iterator[tuple[Path, Path]]:
    """(a path to read, a scratch folder): the path itself, or a frame written to `frame.parquet` in the folder.

    Errors about that temporary file name it `frame`, as compute_advantages does.
    """
    with tempfile.TemporaryDirectory(prefix="empg-") as scratch:
        work = Path(scratch)
        if not isinstance(source, pl.DataFrame):
            yield Path(source), work
            return
        path = work / "frame.parquet"
        source.write_parquet(path)
        try:
            yield path, work
        except EmpgError as exc:
            exc.args = tuple(str(a).replace(str(path), FRAME) for a in exc.args)
            raise
