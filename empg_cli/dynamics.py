"""The numbers behind `empg plot dynamics` and `empg audit` (docs/audit.md), as polars frames.

Every function takes the frame of `load_scored`: one row per step, with `source` (one label per run per file),
`batch` (EMPG's normalisation scope, docs/method.md) and the scored columns (`empg schema scored`). A trajectory succeeds when
`traj_reward > 0`. Quantiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from .advantages import flat_group
from .config import AdvantageConfig
from .errors import BadInput
from .rollouts import InputFiles, open_parquet, open_rollouts, open_source, read_columns, read_metadata
from .schema import is_text
from .validation import ROW

MODEL_COLUMNS = ("step_renyi2", "step_grad_norm_sq", "step_grad_norm_sq_expected")
"""Statistics only a model forward pass gives; null when the entropies were logged at generation time."""
SCORED_COLUMNS = ("step_entropy", *MODEL_COLUMNS, "traj_reward", "adv_base", "empg_h_norm", "empg_g", "adv_empg",
                  "aem_w", "adv_aem")
KEY_COLUMNS = ("group_id", "traj_id", "step")
TEXT_COLUMNS = ("response", "prompt")
"""Where a step's text snippet comes from: `response` text, else `response_ids` decoded (decoded_responses), else
`prompt` text."""
ESTIMATORS = {"base": "adv_base", "empg": "adv_empg", "aem": "adv_aem"}
INVARIANT_TOL = 1e-6
"""Absolute tolerance of the invariant checks (docs/method.md) (float64 sums of a few thousand terms sit far below it)."""

TRAJ = ["source", "iteration", "group_id", "traj_id"]
GROUP = ["source", "iteration", "group_id"]
OUTCOMES = pl.Enum(["success", "failure"])
POSITIONS = pl.Enum(["early", "middle", "late"])
CERTAINTIES = pl.Enum(["confident", "uncertain"])
QUANTITIES = pl.Enum(["grad_norm", "update_base", "update_empg", "update_aem"])

OUTCOME = (pl.when(pl.col("traj_reward") > 0).then(pl.lit("success")).otherwise(pl.lit("failure"))
           .cast(OUTCOMES).alias("outcome"))
"""success when the trajectory's reward R_i > 0, else failure."""
GRAD_NORM = pl.col("step_grad_norm_sq").clip(lower_bound=0.0).sqrt()
"""‖∇_z log π‖ per step; the clip only removes float round-off below 0 (1 − 2p + Σp² ≥ 0 exactly)."""


def update_magnitude(adv_column: str) -> pl.Expr:
    """Effective update magnitude |A| · ‖∇_z log π‖ of a step (null without model statistics)."""
    return pl.col(adv_column).abs() * GRAD_NORM


def _labels(paths: Sequence[Path]) -> list[str]:
    """File labels: the stems, or the full paths when two stems collide."""
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def _advantage_settings(schema: pa.Schema) -> dict:
    """The advantage hyperparameters stored in the file's `empg` metadata ({} when it has none)."""
    return (read_metadata(schema) or {}).get("advantages") or {}


def _batch_key(source: InputFiles, schema: pa.Schema) -> list[str]:
    """The batch key the advantages were computed with (the file's `empg` metadata), default (run, iteration)."""
    key = list(_advantage_settings(schema).get("batch_key") or ["run", "iteration"])
    for name in key:
        if name not in schema.names and name not in ("run", "iteration"):
            raise BadInput(source, "is the batch key of this file's advantages (empg metadata) but is missing",
                           column=name)
    return key


def _read_one(path: Path, label: str, prefix: bool) -> tuple[pl.DataFrame, list[str]]:
    """One scored file (or folder or glob of them), validated, as a step frame with `file` and `batch` (label
    string), `path` and `row` of each step in its own file; also its batch labels in order."""
    source, schema = open_source(path)
    for name in (*KEY_COLUMNS, *SCORED_COLUMNS):
        if name not in schema.names:
            raise BadInput(source, "is missing; this is not a scored file (make one with `empg score`)", column=name)
    batch_key = _batch_key(source, schema)
    rollouts = open_rollouts(path, AdvantageConfig(batch_key=tuple(batch_key)), scored=SCORED_COLUMNS, content=False)
    texts = [c for c in TEXT_COLUMNS if c in schema.names and is_text(schema.field(c).type)]
    # response text; else the response ids, decoded later for the few steps shown (decoded_responses); else prompt
    text = texts[0] if texts and (texts[0] == "response" or "response_ids" not in schema.names) else None
    read = [c for c in dict.fromkeys([*SCORED_COLUMNS, *batch_key, *([text] if text else [])])
            if c in schema.names and c not in rollouts.steps.columns]
    file_of_row = np.searchsorted(np.asarray(source.starts), rollouts.steps[ROW].to_numpy(), side="right") - 1
    frame = pl.concat([rollouts.steps, pl.from_arrow(read_columns(source, schema, read))], how="horizontal")
    frame = frame.with_columns(
        pl.col(*SCORED_COLUMNS).cast(pl.Float64),
        (pl.col(text).cast(pl.String) if text else pl.lit(None, pl.String)).alias("text"),
        file=pl.lit(label), path=pl.Series([str(f) for f in source.files])[file_of_row],
        row=pl.col(ROW) - pl.Series(source.starts, dtype=pl.Int64)[file_of_row],
        aem_min_range=pl.lit(float(_advantage_settings(schema).get("aem_min_range", AdvantageConfig.aem_min_range))))
    label_expr = pl.concat_str([pl.format(f"{k}={{}}", pl.col(k)) for k in batch_key], separator=", ")
    if prefix:
        label_expr = pl.format(f"{label}: {{}}", label_expr)
    frame = frame.with_columns(batch=label_expr)
    order = frame.select(*batch_key, "batch").unique().sort(batch_key)["batch"].to_list()
    return frame, order


def load_scored(paths: Sequence[Path]) -> pl.DataFrame:
    """One step frame from one or more scored Parquet files (`empg schema scored`), in file order.

    Columns: file, source, batch, run, iteration, group_id, traj_id, step, the scored statistics and advantages,
    `text` (the step's `response`, else its `prompt`, else null), the step's `path` and `row` in its file, and the
    AEM threshold delta its advantages used (`aem_min_range`, from the metadata). `source` is the run name when that run is in
    one file only, else "file:run"; `batch` names the batch-key values (from the file's `empg` metadata, default
    run and iteration), prefixed with the file when there are several. Both are Enums in file-then-key order.
    Raises BadInput for a missing, unreadable or non-scored file.
    """
    paths = [Path(p) for p in paths]
    labels = _labels(paths)
    read = [_read_one(p, lab, len(paths) > 1) for p, lab in zip(paths, labels)]
    frame = pl.concat([f for f, _ in read], how="diagonal_relaxed")
    shared = frame.group_by("run").agg(pl.col("file").n_unique() > 1).filter(pl.col("file"))["run"]
    frame = frame.with_columns(source=pl.when(pl.col("run").is_in(shared.implode()))
                               .then(pl.format("{}:{}", "file", "run")).otherwise("run"))
    sources = frame.select("file", "source").unique().sort(pl.col("file").cast(pl.Enum(labels)), "source")["source"]
    batches = [b for _, order in read for b in order]
    return (frame.with_columns(pl.col("source").cast(pl.Enum(sources)), pl.col("batch").cast(pl.Enum(batches)))
            .select("file", "source", "batch", "run", "iteration", *KEY_COLUMNS, *SCORED_COLUMNS, "text", "path",
                    "row", "aem_min_range"))


def has_model_statistics(frame: pl.DataFrame) -> bool:
    """Whether any row carries ‖∇_z log π‖² (False when every entropy was logged rather than rescored)."""
    return frame["step_grad_norm_sq"].null_count() < frame.height


def _summary(frame: pl.DataFrame, keys: list[str], column: str) -> pl.DataFrame:
    """Per key: n (non-null values), mean, q25, q75 of `column`, sorted by the keys."""
    x = pl.col(column)
    return (frame.group_by(keys)
            .agg(n=x.count(), mean=x.mean(), q25=x.quantile(0.25, "linear"), q75=x.quantile(0.75, "linear"))
            .sort(keys))


def entropy_drift(frame: pl.DataFrame) -> pl.DataFrame:
    """Step entropy H_t (nats) per (source, iteration, outcome): n, mean, q25, q75 (the interquartile band)."""
    return _summary(frame.with_columns(OUTCOME), ["source", "iteration", "outcome"], "step_entropy")


def position_in_trajectory() -> pl.Expr:
    """early / middle / late: the third floor(3 t / T) of step t in a trajectory of T steps.

    early: t < T/3, middle: T/3 ≤ t < 2T/3, late: t ≥ 2T/3. A 1-step trajectory is all early; a 2-step one is
    early then middle.
    """
    third = (3 * pl.col("step")) // pl.len().over(TRAJ)
    return third.replace_strict([0, 1, 2], ["early", "middle", "late"], return_dtype=POSITIONS).alias("position")


def entropy_by_position(frame: pl.DataFrame) -> pl.DataFrame:
    """Step entropy H_t (nats) per (source, iteration, position) over all trajectories: n, mean, q25, q75."""
    return _summary(frame.with_columns(position_in_trajectory()), ["source", "iteration", "position"], "step_entropy")


def grad_norm_by_iteration(frame: pl.DataFrame) -> pl.DataFrame:
    """‖∇_z log π‖² per (source, iteration): n (non-null), mean, q25, q75; all null without model statistics."""
    return _summary(frame, ["source", "iteration"], "step_grad_norm_sq")


def entropy_decile(column: str = "step_entropy") -> pl.Expr:
    """Decile 1..10 of an entropy (H_t by default) within its source: d = 1 + #{k in 1..9 : H_t > q_{k/10}}.

    Bins are right-closed, (q_{(d-1)/10}, q_{d/10}], so tied entropies share a bin and a flat source is all decile 1.
    """
    h = pl.col(column)
    above = [(h > h.quantile(k / 10, "linear").over("source")).cast(pl.Int32) for k in range(1, 10)]
    return (1 + pl.sum_horizontal(above)).alias("decile")


def entropy_deciles(frame: pl.DataFrame) -> pl.DataFrame:
    """Per (source, entropy decile): n, entropy range and mean (nats), mean ‖∇_z log π‖² measured and expected
    (1 − Σp², Proposition 1), and mean update magnitude |A| · ‖∇_z log π‖ for base, EMPG and AEM."""
    h = pl.col("step_entropy")
    return (frame.with_columns(entropy_decile()).group_by("source", "decile")
            .agg(n=pl.len(), entropy_min=h.min(), entropy_max=h.max(), entropy_mean=h.mean(),
                 grad_norm_sq_mean=pl.col("step_grad_norm_sq").mean(),
                 grad_norm_sq_expected_mean=pl.col("step_grad_norm_sq_expected").mean(),
                 **{f"update_{name}": update_magnitude(col).mean() for name, col in ESTIMATORS.items()})
            .sort("source", "decile"))


def renyi2_deciles(frame: pl.DataFrame) -> pl.DataFrame:
    """Per (source, decile of the step's Rényi-2 entropy H2), over steps with model statistics: n, mean H2 (nats),
    mean ‖∇_z log π‖² measured (step_grad_norm_sq) and as Proposition 1 predicts for the step's own tokens
    (step_grad_norm_sq_expected, mean_j 1 − exp(−H2_j)); the two agree in expectation over the sampled tokens."""
    model = frame.filter(pl.col("step_renyi2").is_not_null())
    return (model.with_columns(entropy_decile("step_renyi2")).group_by("source", "decile")
            .agg(n=pl.len(), renyi2_mean=pl.col("step_renyi2").mean(),
                 grad_norm_sq_mean=pl.col("step_grad_norm_sq").mean(),
                 grad_norm_sq_expected_mean=pl.col("step_grad_norm_sq_expected").mean())
            .sort("source", "decile"))


def certainty() -> pl.Expr:
    """confident: H_norm ≤ the batch's 1/3-quantile; uncertain: H_norm > its 2/3-quantile; the middle third null."""
    h = pl.col("empg_h_norm")
    return (pl.when(h <= h.quantile(1 / 3, "linear").over("batch")).then(pl.lit("confident"))
            .when(h > h.quantile(2 / 3, "linear").over("batch")).then(pl.lit("uncertain"))
            .cast(CERTAINTIES).alias("certainty"))


def _grid(keys: pl.DataFrame, **levels: pl.Enum) -> pl.DataFrame:
    """Every distinct row of `keys` with every level of each Enum, so that empty cells still get a row."""
    keys = keys.unique()
    for name, enum in levels.items():
        keys = keys.join(pl.DataFrame({name: enum.categories.to_list()}, schema={name: enum}), how="cross")
    return keys


def quadrants(frame: pl.DataFrame) -> pl.DataFrame:
    """Per batch × certainty × outcome (all four cells, empty ones with n_steps 0): mean |A| per estimator and
    the amplification ratios mean|A_empg| / mean|A_base| and mean|A_aem| / mean|A_base| (null when the base is 0)."""
    means = (frame.with_columns(certainty(), OUTCOME).drop_nulls("certainty")
             .group_by("batch", "certainty", "outcome")
             .agg(n_steps=pl.len(), **{f"mean_abs_adv_{name}": pl.col(col).abs().mean()
                                       for name, col in ESTIMATORS.items()}))
    base = pl.col("mean_abs_adv_base")
    ratios = [pl.when(base > 0).then(pl.col(f"mean_abs_adv_{name}") / base).alias(f"amplification_{name}")
              for name in ("empg", "aem")]
    return (_grid(frame.select("batch"), certainty=CERTAINTIES, outcome=OUTCOMES)
            .join(means, on=["batch", "certainty", "outcome"], how="left")
            .with_columns(pl.col("n_steps").fill_null(0).cast(pl.Int64), *ratios)
            .sort("batch", "certainty", "outcome"))


def top_steps(frame: pl.DataFrame, n: int, outcome: str) -> pl.DataFrame:
    """The n lowest-entropy steps of failed trajectories (`failure`: confident mistakes) or the n highest-entropy
    steps of successful ones (`success`: uncertain successes); ties in H_t broken by the step's keys."""
    descending = outcome == "success"
    top = (frame.with_columns(OUTCOME).filter(pl.col("outcome") == outcome)
           .sort(["step_entropy", *TRAJ, "step"], descending=[descending] + [False] * 5)
           .head(n))
    return (top.with_columns(text=decoded_responses(top))
            .select("source", "batch", "iteration", "group_id", "traj_id", "step", "step_entropy", "empg_h_norm",
                    "traj_reward", "adv_base", "adv_empg", "adv_aem", "text"))


def decoded_responses(steps: pl.DataFrame) -> pl.Series:
    """`text`, where a step has none: its `response_ids` decoded by the tokenizer of the checkpoint that scored it
    (found through the file's `empg` metadata), else its `prompt` text, else null.

    Only these steps' rows are read, so a large file costs one lookup per step.
    """
    import pyarrow.dataset as ds

    texts = steps["text"].to_list()
    missing = steps.with_row_index("i").filter(pl.col("text").is_null())
    for (path,), part in missing.group_by("path"):
        schema = open_parquet(Path(path)).schema_arrow
        columns = [c for c in ("response_ids", "prompt") if c in schema.names
                   and (c == "response_ids" or is_text(schema.field(c).type))]
        if not columns:
            continue
        found = ds.dataset(path, format="parquet").take(part["row"].to_arrow(), columns=columns).to_pydict()
        none = [None] * part.height
        folders = {it: _tokenizer_folder(Path(path), it) for it in part["iteration"].unique()}
        for i, iteration, ids, prompt in zip(part["i"], part["iteration"], found.get("response_ids", none),
                                             found.get("prompt", none)):
            folder = folders[iteration]
            tokenizer = _load_tokenizer(folder) if ids is not None and folder is not None else None
            texts[i] = tokenizer.decode(ids, skip_special_tokens=False) if tokenizer is not None else prompt
    return pl.Series("text", texts, dtype=pl.String)


def tokenizer_for(path: Path, iteration: int):
    """The tokenizer of the checkpoint that scored `iteration` in the scored file `path`; None when the entropies
    were logged (no model) or no readable tokenizer is found."""
    folder = _tokenizer_folder(path, iteration)
    return None if folder is None else _load_tokenizer(folder)


def _tokenizer_folder(path: Path, iteration: int) -> Path | None:
    """The folder holding the tokenizer of the checkpoint that scored `iteration` in the scored file `path`.

    Tried in order, for the checkpoint recorded in the metadata and then its model reference: the folder as written
    (relative to where `empg score` ran) or a hub id in the local cache, then the path relative to the file's
    folder (where `empg score` resolves a reference taken from its input's metadata).
    """
    model = (read_metadata(open_parquet(path).schema_arrow) or {}).get("model") or {}
    recorded = [ref for ref, seen in (model.get("checkpoints") or {}).items() if iteration in seen.get("iterations", [])]
    template = str(model.get("ref") or "").replace("{iteration}", str(iteration))
    refs = [*recorded, *([template] if template else [])]
    if not refs:  # entropies from the logs: no model, and no torch import for nothing
        return None
    from .scoring import TOKENIZER_FILES, local_model_dir
    folders = (folder for ref in refs for folder in (local_model_dir(ref), path.parent / ref))
    return next((f for f in folders if f is not None and any((f / n).is_file() for n in TOKENIZER_FILES)), None)


@functools.cache
def _load_tokenizer(folder: Path):
    """The tokenizer in `folder`, loaded once per process; None if it cannot be read."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:  # a snippet is a courtesy: any unreadable tokenizer leaves it to the prompt or null
        return None


def correlations(frame: pl.DataFrame) -> pl.DataFrame:
    """Per source, over the steps with model statistics: Pearson and Spearman correlation of H_t with ‖∇_z log π‖
    (the policy's own coupling) and with |A| · ‖∇_z log π‖ before (base) and after modulation (EMPG, AEM).

    Null where fewer than two steps have ‖∇_z log π‖ or a quantity is constant (no variance, no correlation).
    """
    quantities = {"grad_norm": GRAD_NORM,
                  **{f"update_{name}": update_magnitude(col) for name, col in ESTIMATORS.items()}}
    rows = frame.filter(pl.col("step_grad_norm_sq").is_not_null()).with_columns(**quantities)
    found = pl.concat([rows.group_by("source").agg(
        quantity=pl.lit(name).cast(QUANTITIES), n_steps=pl.len(),
        pearson=pl.corr("step_entropy", name), spearman=pl.corr("step_entropy", name, method="spearman"))
        for name in quantities])
    return (_grid(frame.select("source"), quantity=QUANTITIES).join(found, on=["source", "quantity"], how="left")
            .with_columns(pl.col("n_steps").fill_null(0).cast(pl.Int64), pl.col("pearson", "spearman").fill_nan(None))
            .sort("source", "quantity"))


def invariants(frame: pl.DataFrame) -> pl.DataFrame:
    """The invariants of docs/method.md: mean_B g = 1 and mean_B A_empg = 0 per batch, mean_G w = 1 per group G
    whose entropy spread is at least delta (`aem_min_range`; flatter groups keep w = 1 by rule).

    One row each: scope, n_checked, max_abs_deviation (null when nothing was checked), tolerance, passed.
    """
    h = pl.col("step_entropy")
    per_batch = frame.group_by("batch").agg(g=(pl.col("empg_g").mean() - 1).abs(), a=pl.col("adv_empg").mean().abs())
    per_group = (frame.group_by(GROUP).agg(w=(pl.col("aem_w").mean() - 1).abs(), spread=h.max() - h.min(),
                                           delta=pl.col("aem_min_range").first())
                 .filter(~flat_group(pl.col("spread"), pl.col("delta"))))
    checks = [("mean_B empg_g = 1", "batch", per_batch["g"]), ("mean_B adv_empg = 0", "batch", per_batch["a"]),
              ("mean_G aem_w = 1 (non-flat groups)", "group", per_group["w"])]
    return pl.DataFrame(
        [{"name": name, "scope": scope, "n_checked": len(dev), "max_abs_deviation": dev.max(),
          "tolerance": INVARIANT_TOL, "passed": bool(len(dev) == 0 or dev.max() <= INVARIANT_TOL)}
         for name, scope, dev in checks],
        schema={"name": pl.String, "scope": pl.String, "n_checked": pl.Int64, "max_abs_deviation": pl.Float64,
                "tolerance": pl.Float64, "passed": pl.Boolean})
