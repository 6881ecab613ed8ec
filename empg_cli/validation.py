"""Row-level checks of rollouts and scored tables (docs/method.md, data model), shared by files and in-memory frames.

Every check adds what it finds to a `Problems` collector instead of raising at the first one, so a user fixes a file
in one run: the error lists the first LIMIT problems (file, column, row) and counts the rest. The checks work on
polars key frames and on Arrow arrays of list columns, so a file (rollouts.open_rollouts, chunk by chunk) and a
frame of the library (`check_frame`, source "frame") are validated by the same code.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from .advantages import NEXT, TRAJ as TRAJECTORY, trajectory_structure
from .config import AdvantageConfig
from .errors import BadInput, BadUsage
from .schema import TRAJ_KEYS

ROW = "_row"  # 0-based row index of the input; every error message counts rows this way
LIMIT = 20
"""Problems shown in one error; the rest are counted."""
MAX_TOKEN_ID = 2 ** 31 - 1
"""Token ids are list<int32> in the schema: larger ids fit no vocabulary."""
NON_NEGATIVE = {"step_entropy", "step_renyi2", "n_response_tokens", "token_entropy"}
"""Scored columns that are >= 0 by definition (entropies in nats, token counts)."""
class Problems:
    """Every problem found in one source: `raise_if_any` raises one BadInput listing the first LIMIT and a count.

    `source` is a path, a name such as "frame", or anything with `locate(row) -> (file, row in file)` (a folder or
    glob read as one table), so that each message names the file and row the user can open.
    """

    def __init__(self, source: Any) -> None:
        self.source = source
        self.shown: list[BadInput] = []
        self.total = 0

    def add(self, message: str, *, column: str | None = None, row: int | None = None,
            trajectory: str | None = None) -> None:
        self.total += 1
        if len(self.shown) < LIMIT:
            self.shown.append(BadInput(self.source, message, column=column, row=row, trajectory=trajectory))

    def add_rows(self, column: str, rows: Sequence[int] | np.ndarray, message: Callable[[int], str]) -> None:
        """One problem per offending row; `message(k)` describes rows[k] (only called for the rows shown)."""
        rows = np.asarray(rows)
        for k in range(min(len(rows), max(LIMIT - len(self.shown), 0))):
            self.shown.append(BadInput(self.source, message(k), column=column, row=int(rows[k])))
        self.total += len(rows)

    def raise_if_any(self) -> None:
        if self.total:
            raise BadInput.listing(self.shown, self.total)


def first_true(mask: pl.Series) -> int | None:
    """Index of the first True in a boolean series, or None."""
    hits = mask.fill_null(False).arg_true()
    return int(hits[0]) if len(hits) else None


def describe_trajectory(row: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={row[k]!r}" for k in TRAJ_KEYS) + ")"


def _integer_key(frame: pl.DataFrame, name: str) -> pl.Expr:
    """An integer key as Int64, or as UInt64 when it is one (2^64 - 1 is a valid iteration); else null."""
    return pl.col(name) if frame.schema[name] in (pl.Int64, pl.UInt64) else pl.col(name).cast(pl.Int64, strict=False)


def key_frame(data: pa.Table | pl.DataFrame, problems: Problems, extra: tuple[str, ...] = ()) -> pl.DataFrame:
    """The key columns as polars: `_row`, defaults filled for absent run/iteration, ids as text (an integer id as
    its decimal text), step as Int64; a null or unrepresentable key is a problem."""
    frame = data if isinstance(data, pl.DataFrame) else pl.from_arrow(data)
    if ROW not in frame.columns:
        frame = frame.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias(ROW))
    frame = frame.select(ROW, *(c for c in (*TRAJ_KEYS, "step", "reward", "advantage", *extra) if c in frame.columns))
    if "run" not in frame.columns:
        frame = frame.with_columns(run=pl.lit("default"))
    if "iteration" not in frame.columns:
        frame = frame.with_columns(iteration=pl.lit(0, pl.Int64))
    given = frame
    frame = frame.with_columns(pl.col("run", "group_id", "traj_id").cast(pl.String), _integer_key(frame, "iteration"),
                               pl.col("step").cast(pl.Int64, strict=False),
                               pl.col("^(reward|advantage)$").cast(pl.Float64, strict=False))
    for name in (*TRAJ_KEYS, "step", *extra):
        problems.add_rows(name, frame.filter(given[name].is_null())[ROW],
                          lambda k: "is null; ids and keys must be set on every row")
        lost = given[name].is_not_null() & frame[name].is_null()
        values = given.filter(lost)[name]
        problems.add_rows(name, frame.filter(lost)[ROW],
                          lambda k, values=values: f"{values[k]} is not representable as a 64-bit integer")
    return frame


def _with_keys(frame: pl.DataFrame) -> pl.DataFrame:
    """The trajectories whose keys and steps are all set (a null one is already reported)."""
    return frame.drop_nulls(TRAJ_KEYS).filter(pl.col("step").is_not_null().all().over(TRAJ_KEYS))


def _looks_like_training_step(first: int, n: int, distinct: int) -> bool:
    """A trajectory whose `step` repeats one value, or starts far above 0, holds a trainer's training step."""
    return first > 0 and ((n > 1 and distinct == 1) or first >= 10)


def check_steps(frame: pl.DataFrame, problems: Problems) -> None:
    """Steps are 0..T-1 with no duplicates and no gaps in every trajectory."""
    frame = _with_keys(frame)
    negative = frame.filter(pl.col("step") < 0)
    problems.add_rows("step", negative[ROW], lambda k: f"step is {negative['step'][k]}; steps are 0-based")
    per_traj = (frame.group_by(TRAJ_KEYS, maintain_order=True)
                .agg(pl.col(ROW).min(), pl.len().alias("n"), pl.col("step").n_unique().alias("distinct"),
                     pl.col("step").min().alias("first"), pl.col("step").max().alias("last"),
                     pl.col("step").sort().alias("steps"),
                     pl.col("step").filter(pl.col("step").is_duplicated()).min().alias("repeated"),
                     pl.col(ROW).filter(pl.col("step").is_duplicated()).sort().head(5).alias("repeated_rows"))
                .filter((pl.col("first") >= 0) & ((pl.col("distinct") < pl.col("n")) | (pl.col("last") != pl.col("n") - 1))))
    for bad in per_traj.iter_rows(named=True):
        if bad["distinct"] < bad["n"]:
            message = (f"step {bad['repeated']} appears twice in this trajectory (rows "
                       f"{', '.join(map(str, bad['repeated_rows']))})")
        else:
            shown = ", ".join(map(str, bad["steps"][:8])) + (", ..." if len(bad["steps"]) > 8 else "")
            message = f"steps are {shown}; expected 0..{bad['n'] - 1} with no gaps"
        if _looks_like_training_step(bad["first"], bad["n"], bad["distinct"]):
            message += ("; this `step` looks like a training step, which belongs in `iteration` "
                        "(`step` is the turn index within the trajectory)")
        problems.add(message, column="step", trajectory=describe_trajectory(bad), row=bad[ROW])


def check_numbers(values: pl.Series, rows: pl.Series, column: str, problems: Problems, *, nullable: bool,
                  non_negative: bool = False) -> None:
    """A float column: finite (and >= 0 where asked) where set; set on every row unless nullable."""
    values = values.cast(pl.Float64, strict=False)
    bad = ~values.is_finite()
    if non_negative:
        bad = bad | (values < 0)
    bad = bad.fill_null(not nullable)
    wrong = values.filter(bad)
    need = "a finite number >= 0" if non_negative else "a finite number"
    problems.add_rows(column, rows.filter(bad), lambda k: f"{column} is {'null' if wrong[k] is None else wrong[k]}; "
                                                          f"must be {need}")


def check_value_per_trajectory(frame: pl.DataFrame, problems: Problems, column: str, reward_agg: str | None) -> None:
    """Finite values; at least one per trajectory; equal within the trajectory unless summed."""
    frame = _with_keys(frame)
    check_numbers(frame[column], frame[ROW], column, problems, nullable=True)
    value = pl.col(column).filter(pl.col(column).is_finite())
    per_traj = frame.group_by(TRAJ_KEYS, maintain_order=True).agg(
        pl.col(ROW).min(), pl.col(column).drop_nulls().len().alias("set"), value.n_unique().alias("distinct"),
        value.unique(maintain_order=True).head(3).alias("values"))
    for bad in per_traj.filter(pl.col("set") == 0).iter_rows(named=True):
        problems.add(f"{column} is null on every step of this trajectory", column=column,
                     trajectory=describe_trajectory(bad), row=bad[ROW])
    if reward_agg != "sum":
        hint = "; pass --reward-agg sum to sum per-step rewards" if column == "reward" else ""
        for bad in per_traj.filter(pl.col("distinct") > 1).iter_rows(named=True):
            problems.add(f"{column} differs within this trajectory ({', '.join(map(str, bad['values']))}){hint}",
                         column=column, trajectory=describe_trajectory(bad), row=bad[ROW])


def _flagged(lists: pl.Series, wrong: Callable[[pl.Expr], pl.Expr], offset: int) -> tuple[np.ndarray, list]:
    """Rows (from `offset`) holding an element for which `wrong` is true, and each one's first such element."""
    rows = lists.list.eval(wrong(pl.element())).list.any().fill_null(False).arg_true()
    first = lists.gather(rows).list.eval(pl.element().filter(wrong(pl.element()))).list.first()
    return offset + rows.to_numpy(), first.to_list()


def check_list_or_text(array: pa.ChunkedArray | pa.Array, column: str, offset: int, problems: Problems) -> None:
    """A prompt or response column (rows from `offset`): set and non-empty on every row; token ids in
    [0, 2^31) with no null among them; every message with a role and content. (In polars: pyarrow's compute
    functions import pandas, ~0.3 s, on first use.)"""
    values = pl.Series(pl.from_arrow(array))
    problems.add_rows(column, offset + values.is_null().arg_true().to_numpy(), lambda k: "is null")
    lengths = values.str.len_bytes() if values.dtype == pl.String else values.list.len()
    problems.add_rows(column, offset + (lengths == 0).fill_null(False).arg_true().to_numpy(),
                      lambda k: "is empty; every step needs at least one token here")
    if values.dtype == pl.String:
        return
    if column == "messages":
        for part in ("role", "content"):
            rows, _ = _flagged(values, lambda m, part=part: m.struct.field(part).is_null(), offset)
            problems.add_rows(column, rows, lambda k, part=part: f"a message has a null {part}")
        return
    rows, _ = _flagged(values, lambda t: t.is_null(), offset)
    problems.add_rows(column, rows, lambda k: "a token id is null")
    rows, first = _flagged(values, lambda t: (t < 0) | (t > MAX_TOKEN_ID), offset)
    problems.add_rows(column, rows, lambda k: f"token id {first[k]} is negative or too large (ids are 0..2^31-1)")


def check_token_entropy(array: pa.ChunkedArray | pa.Array, offset: int, problems: Problems, *, required: bool,
                        response_ids: pa.ChunkedArray | pa.Array | None = None) -> None:
    """Logged entropies (rows from `offset`): each finite and >= 0 (nats), one per response token when
    response_ids say how many; on every row when `required` (--entropy-source logged)."""
    values = pl.Series(pl.from_arrow(array))
    lengths = values.list.len()
    if required:
        absent = (lengths == 0).fill_null(True).arg_true().to_numpy()
        problems.add_rows("token_entropy", offset + absent,
                          lambda k: "has no entropies on this row; --entropy-source logged needs them on every row")
    rows, first = _flagged(values, lambda h: (~(h.is_finite() & (h >= 0))).fill_null(True), offset)
    problems.add_rows("token_entropy", rows,
                      lambda k: f"entropy {'null' if first[k] is None else first[k]} is not a finite number >= 0 (nats)")
    if response_ids is not None:
        n_ids = pl.Series(pl.from_arrow(response_ids)).list.len()
        differ = (lengths != n_ids).fill_null(False).arg_true().to_numpy()
        problems.add_rows("token_entropy", offset + differ,
                          lambda k: f"has {lengths[int(differ[k])]} entropies for {n_ids[int(differ[k])]} response_ids")


def check_keys(data: pa.Table | pl.DataFrame, source: Any, advantages: AdvantageConfig,
               problems: Problems | None = None) -> pl.DataFrame:
    """The key frame of a rollouts table, checked for what the advantages need: the batch-key and (for
    `--estimator column`) `advantage` columns present, ids set, steps 0..T-1, one reward (and advantage) per
    trajectory. `data` holds the key columns (extra columns are ignored). Problems go to `problems`, else they
    are raised here, all in one BadInput."""
    return checked_steps(data, source, advantages, problems)[0]


def checked_steps(data: pa.Table | pl.DataFrame, source: Any, advantages: AdvantageConfig,
                  problems: Problems | None = None) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """check_keys' frame and the trajectory structure its check computed (advantages.trajectory_structure), which
    advantages.advantage_table can reuse (None when a key is null)."""
    names = data.column_names if isinstance(data, pa.Table) else data.columns
    for key in advantages.batch_key:
        if key not in names and key not in ("run", "iteration"):
            raise BadUsage(f"--batch-key column '{key}' is not in {source}")
    if advantages.estimator == "column" and "advantage" not in names:
        raise BadInput(source, "--estimator column needs the column 'advantage'")
    found = problems or Problems(source)
    extra = tuple(dict.fromkeys(k for k in advantages.batch_key if k not in TRAJ_KEYS and k != "step"))
    before = found.total
    frame = key_frame(data, found, extra)
    values = {"reward": advantages.reward_agg, **({"advantage": None} if advantages.estimator == "column" else {})}
    structure = trajectory_structure(frame, list(advantages.batch_key)) if found.total == before else None
    if structure is None or not _all_trajectories_valid(frame, structure, values):
        check_steps(frame, found)  # the detailed checks name every offending row
        for column, agg in values.items():
            check_value_per_trajectory(frame, found, column, agg)
    if problems is None:
        found.raise_if_any()
    return frame, structure


def _all_trajectories_valid(frame: pl.DataFrame, structure: pl.DataFrame, values: dict[str, str | None]) -> bool:
    """Whether check_steps and check_value_per_trajectory would both pass, from the trajectory structure (a fraction
    of their cost on valid data): T distinct steps from 0 to T-1; finite values, at least one per trajectory, equal
    unless summed (`values` maps each column to its reward_agg).

    Along each trajectory's successor links (structure's `_next`, steps in order) every step is its predecessor + 1
    and the first is 0; a column without nulls is equal along the same links; one with nulls takes a group-by.
    """
    step = frame["step"].to_numpy()
    successor = structure[NEXT].to_numpy()
    linked = successor >= 0
    first = np.ones(len(step), dtype=bool)
    first[successor[linked]] = False
    if not ((step[successor[linked]] == step[linked] + 1).all() and (step[first] == 0).all()):
        return False
    finite = pl.all_horizontal((pl.col(c).is_finite() | pl.col(c).is_null()).all() for c in values)
    if not frame.select(finite).item():
        return False
    grouped = []
    for column, agg in values.items():
        if frame[column].null_count() == 0:
            value = frame[column].to_numpy()
            if agg != "sum" and not (value[successor[linked]] == value[linked]).all():
                return False
        else:
            grouped.append(pl.col(column).count() > 0)
            if agg != "sum":
                grouped.append(pl.col(column).min() == pl.col(column).max())
    if not grouped:
        return True
    per_trajectory = frame.with_columns(structure[TRAJECTORY]).group_by(TRAJECTORY).agg(pl.all_horizontal(grouped))
    return bool(per_trajectory.to_series(1).all())


def check_step_entropy(entropy: pl.Series, problems: Problems) -> None:
    """Step entropies H_t are set, finite and >= 0 (nats) on every row."""
    check_numbers(entropy, pl.int_range(len(entropy), eager=True), entropy.name, problems, nullable=False,
                  non_negative=True)
