"""Input validation a user can act on in one run: every problem listed, scored files checked as strictly as
rollouts, integer keys of any width, folder and glob inputs, metadata treated as data."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_rollouts
from empg_cli.advantages import ADVANTAGE_COLUMNS
from empg_cli.cli import main
from empg_cli.errors import BadInput
import empg_cli as empg

INT64_MIN, UINT64_MAX = -2 ** 63, 2 ** 64 - 1


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows(n_traj: int = 4, steps: int = 2, **overrides) -> dict[str, list]:
    """n_traj trajectories of `steps` steps in two groups, with ids, rewards and logged entropies."""
    out: dict[str, list] = {k: [] for k in ("group_id", "traj_id", "step", "prompt_ids", "response_ids", "reward",
                                            "token_entropy")}
    for t in range(n_traj):
        for s in range(steps):
            out["group_id"].append(f"g{t % 2}")
            out["traj_id"].append(f"t{t}")
            out["step"].append(s)
            out["prompt_ids"].append([5, 6 + s])
            out["response_ids"].append([7, 8, 9][: 1 + (t + s) % 3])
            out["reward"].append(float(t % 3 == 0))
            out["token_entropy"].append([0.1 * (1 + t + s)] * (1 + (t + s) % 3))
    out.update(overrides)
    return out


def scored_file(tmp_path, capsys, name: str = "runs", **overrides):
    """A scored file made by `empg score --entropy-source logged` (no model needed)."""
    src = write_rollouts(tmp_path / f"{name}.parquet", rows(**overrides))
    out = tmp_path / f"{name}.scored.parquet"
    code, _, err = run_cli(capsys, "score", src, "--entropy-source", "logged", "-o", out)
    assert code == 0, err
    return out


def with_column(path, name, values, pa_type=None, out=None):
    """The Parquet file with one column replaced (metadata kept), written to `out` (default: in place)."""
    table = pq.read_table(path)
    table = table.set_column(table.column_names.index(name), name, pa.array(values, pa_type))
    pq.write_table(table, out or path)
    return out or path


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    lines = err.rstrip("\n").splitlines()
    assert lines[0].startswith("error: ") and all(line.startswith("  ") for line in lines[1:]), err
    return lines


# ---- every problem listed (issue 9 item 4) -------------------------------------------------------------------

def test_every_problem_is_listed_up_to_20_then_counted(tmp_path, capsys):
    n = 16
    bad = rows(n_traj=n)
    bad["reward"] = [math.nan] * (2 * n)  # 32 non-finite rewards, then 16 trajectories with no usable reward
    src = write_rollouts(tmp_path / "runs.parquet", bad)
    code, out, err = run_cli(capsys, "validate", src)
    assert code == 2 and out == ""
    lines = error_lines(err)
    assert lines[0] == f"error: {src}: column 'reward', row 0: reward is nan; must be a finite number"
    assert lines[1] == f"  {src}: column 'reward', row 1: reward is nan; must be a finite number"
    assert len(lines) == 21 and lines[-1] == f"  ... and {2 * n - 20} more"


def test_problems_of_different_columns_are_reported_together(tmp_path, capsys):
    bad = rows(step=[0, 1, 0, 5, 0, 1, 0, 1], reward=[1.0, 1.0, math.inf, 0.0, 0.0, 0.0, 1.0, 1.0])
    bad["response_ids"][6], bad["token_entropy"][6] = [7, None], [0.1, 0.2]
    src = write_rollouts(tmp_path / "runs.parquet", bad)
    code, _, err = run_cli(capsys, "validate", src)
    assert code == 2
    assert error_lines(err) == [
        f"error: {src}: column 'step', trajectory (run='default', iteration=0, group_id='g1', traj_id='t1'), "
        f"row 2: steps are 0, 5; expected 0..1 with no gaps",
        f"  {src}: column 'reward', row 2: reward is inf; must be a finite number",
        f"  {src}: column 'response_ids', row 6: a token id is null"]


def test_integer_group_and_trajectory_ids_are_read_as_their_decimal_text(tmp_path, capsys):
    ints = rows()
    ints["group_id"] = [int(g[1:]) for g in ints["group_id"]]
    ints["traj_id"] = [int(t[1:]) for t in ints["traj_id"]]
    a = write_rollouts(tmp_path / "ints.parquet", ints)
    b = write_rollouts(tmp_path / "text.parquet", rows(group_id=[str(g) for g in ints["group_id"]],
                                                      traj_id=[str(t) for t in ints["traj_id"]]))
    for src in (a, b):
        code, _, err = run_cli(capsys, "score", src, "--entropy-source", "logged")
        assert code == 0, err
    left = pl.read_parquet(tmp_path / "ints.scored.parquet").select(ADVANTAGE_COLUMNS)
    right = pl.read_parquet(tmp_path / "text.scored.parquet").select(ADVANTAGE_COLUMNS)
    assert left.equals(right)


def test_a_missing_column_suggests_the_closest_present_one(tmp_path, capsys):
    table = pa.table({"group_id": ["g"], "traj_id": ["a"], "step": [0], "prompt": ["p"], "completion": ["c"],
                      "reward": [1.0]})
    pq.write_table(table, tmp_path / "trl.parquet")
    code, _, err = run_cli(capsys, "validate", tmp_path / "trl.parquet")
    assert code == 2 and error_lines(err) == [
        f"error: {tmp_path / 'trl.parquet'}: no policy output column: one of response_ids, response is required; "
        "did you mean 'completion'? (`empg convert --map response=completion`)"]
    pq.write_table(table.rename_columns(["group_id", "trajectory_id", "step", "prompt", "response", "reward"]),
                   tmp_path / "t.parquet")
    code, _, err = run_cli(capsys, "validate", tmp_path / "t.parquet")
    assert code == 2 and "required column 'traj_id' is missing; did you mean 'trajectory_id'? " \
                         "(`empg convert --map traj_id=trajectory_id`)" in err


def test_a_training_step_in_step_is_pointed_to_iteration(tmp_path, capsys):
    src = write_rollouts(tmp_path / "runs.parquet", rows(step=[200] * 8))
    code, _, err = run_cli(capsys, "validate", src)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 4
    assert lines[0] == (f"error: {src}: column 'step', trajectory (run='default', iteration=0, group_id='g0', "
                        "traj_id='t0'), row 0: step 200 appears twice in this trajectory (rows 0, 1); this `step` "
                        "looks like a training step, which belongs in `iteration` (`step` is the turn index within "
                        "the trajectory)")


# ---- scored files are checked as strictly as rollouts (issue 13 items 1 and 6) --------------------------------

@pytest.mark.parametrize("value, shown", [(math.nan, "nan"), (math.inf, "inf"), (None, "null"), (-0.5, "-0.5")])
def test_a_bad_step_entropy_in_a_scored_file_is_exit_2_not_nan_advantages(tmp_path, capsys, value, shown):
    scored = scored_file(tmp_path, capsys)
    entropy = pq.read_table(scored).column("step_entropy").to_pylist()
    entropy[3] = value
    with_column(scored, "step_entropy", entropy, pa.float64())
    before = scored.read_bytes()
    for command in (["advantages", scored, "-o", tmp_path / "adv.parquet"], ["validate", scored],
                    ["audit", scored], ["plot", "dynamics", scored, "--out-dir", tmp_path / "plots"]):
        code, out, err = run_cli(capsys, *command)
        assert code == 2, (command, err)
        assert error_lines(err) == [f"error: {scored}: column 'step_entropy', row 3: step_entropy is {shown}; "
                                    f"must be a finite number >= 0"]
    assert scored.read_bytes() == before
    assert not (tmp_path / "adv.parquet").exists() and not (tmp_path / "plots").exists()


def test_nulls_in_scored_id_lists_and_messages_are_found_by_validate(tmp_path, capsys):
    scored = scored_file(tmp_path, capsys)
    ids = pq.read_table(scored).column("prompt_ids").to_pylist()
    ids[1], ids[2], ids[4] = None, [5, None], [-1, 6]
    with_column(scored, "prompt_ids", ids, pa.list_(pa.int32()))
    code, _, err = run_cli(capsys, "validate", scored)
    assert code == 2 and error_lines(err) == [
        f"error: {scored}: column 'prompt_ids', row 1: is null",
        f"  {scored}: column 'prompt_ids', row 2: a token id is null",
        f"  {scored}: column 'prompt_ids', row 4: token id -1 is negative or too large (ids are 0..2^31-1)"]


def test_a_null_token_id_never_reaches_the_model(tmp_path, capsys, tiny_model_dir):
    bad = rows()
    bad["response_ids"][5], bad["token_entropy"][5] = [7, None, 9], [0.1, 0.2, 0.3]
    src = write_rollouts(tmp_path / "runs.parquet", bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. numpy's "invalid value encountered in cast"
        code, _, err = run_cli(capsys, "score", src, "--model", tiny_model_dir)
    assert code == 2 and error_lines(err) == [f"error: {src}: column 'response_ids', row 5: a token id is null"]


# ---- integer keys of any width (issue 13 item 3) -------------------------------------------------------------

def _step_frame(iterations: list[int], dtype: pl.DataType) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    records = [{"run": "r", "iteration": it, "group_id": f"g{g}", "traj_id": f"t{t}", "step": s,
                "reward": float(rng.integers(0, 2)) if s == 0 else None, "step_entropy": float(rng.gamma(2, 0.3))}
               for it in iterations for g in range(2) for t in range(3) for s in range(3)]
    frame = pl.DataFrame(records, schema_overrides={"iteration": dtype})
    return frame.with_columns(pl.col("reward").max().over("iteration", "group_id", "traj_id"))


@pytest.mark.parametrize("iterations, dtype", [([INT64_MIN, 0], pl.Int64), ([0, UINT64_MAX], pl.UInt64),
                                               ([UINT64_MAX - 1, UINT64_MAX], pl.UInt64)])
def test_extreme_integer_iterations_give_the_same_advantages_as_small_ones(iterations, dtype):
    small = empg.compute_advantages(_step_frame([0, 1], pl.Int64)).select(ADVANTAGE_COLUMNS)
    wide = empg.compute_advantages(_step_frame(iterations, dtype)).select(ADVANTAGE_COLUMNS)
    assert wide.equals(small)


def test_a_uint64_iteration_file_scores_exactly(tmp_path, capsys):
    base = rows()
    iteration = [UINT64_MAX if t >= 2 else 0 for t in range(4) for _ in range(2)]
    src = write_rollouts(tmp_path / "u.parquet", base | {"iteration": [0] * len(iteration)})
    with_column(src, "iteration", iteration, pa.uint64())
    ref = write_rollouts(tmp_path / "r.parquet", base | {"iteration": [min(i, 1) for i in iteration]})
    for path in (src, ref):
        code, _, err = run_cli(capsys, "score", path, "--entropy-source", "logged")
        assert code == 0, err
    got = pl.read_parquet(tmp_path / "u.scored.parquet")
    assert got["iteration"].dtype == pl.UInt64 and got["iteration"].max() == UINT64_MAX
    assert got.select(ADVANTAGE_COLUMNS).equals(pl.read_parquet(tmp_path / "r.scored.parquet").select(ADVANTAGE_COLUMNS))
    code, out, err = run_cli(capsys, "audit", tmp_path / "u.scored.parquet", "--format", "json")
    assert code == 0, err


def test_audit_exits_1_naming_the_failed_invariant(tmp_path, capsys):
    scored = scored_file(tmp_path, capsys)
    adv = pq.read_table(scored).column("adv_empg").to_pylist()
    with_column(scored, "adv_empg", [a + 0.5 for a in adv], pa.float64())
    code, out, err = run_cli(capsys, "audit", scored, "--format", "json")
    assert code == 1 and json.loads(out)["schema"] == "empg.audit.v1"
    assert err == "error: invariant check failed: mean_B adv_empg = 0 (see the Invariants section)\n"


# ---- the in-memory frame (the library's validation) ----------------------------------------------------------

def test_the_library_lists_problems_of_an_in_memory_frame():
    frame = _step_frame([0, 1], pl.Int64).with_columns(
        step_entropy=pl.when(pl.int_range(pl.len()) == 4).then(float("nan")).otherwise(pl.col("step_entropy")),
        step=pl.when(pl.int_range(pl.len()) == 7).then(None).otherwise(pl.col("step")))
    with pytest.raises(BadInput) as info:
        empg.compute_advantages(frame)
    assert str(info.value).splitlines() == [
        "frame: column 'step', row 7: is null; ids and keys must be set on every row",
        "  frame: column 'step_entropy', row 4: step_entropy is nan; must be a finite number >= 0"]
