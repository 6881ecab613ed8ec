"""The public library (`import empg_cli as empg`, docs/api.md): its surface, and the CLI's checks and results in
memory. The advantage numbers themselves are checked against the float64 reference in test_advantages.py."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

import empg_cli as empg
from conftest import random_rollouts, write_rollouts
from empg_cli.advantages import ADVANTAGE_COLUMNS
from empg_cli.cli import main
from empg_cli.config import AdvantageConfig, ScoreConfig
from empg_cli.pipeline import score_file

API = ["compute_advantages", "score", "read_rollouts", "load_scored", "audit", "convert"]


def test_the_surface_is_the_documented_one() -> None:
    """The names and keyword defaults of docs/api.md; the defaults are the CLI's (AdvantageConfig, ScoreConfig)."""
    assert all(callable(getattr(empg, name)) for name in API)
    assert issubclass(empg.BadInput, empg.EmpgError) and issubclass(empg.BadUsage, empg.EmpgError)
    params = inspect.signature(empg.compute_advantages).parameters
    assert list(params) == ["frame", "estimator", "reward_agg", "k", "k_future", "zeta", "empg_norm", "aem_tau",
                            "aem_min_range", "batch_key"]
    defaults = {name: p.default for name, p in params.items() if name != "frame"}
    assert defaults == {**AdvantageConfig().__dict__, "batch_key": ("run", "iteration")}
    assert defaults["aem_min_range"] == 0.1
    score = inspect.signature(empg.score).parameters
    assert {n: score[n].default for n in ("model", "temperature", "device", "dtype", "entropy_source", "token_level",
                                          "batch_tokens")} == \
        {n: getattr(ScoreConfig(), n) for n in ("model", "temperature", "device", "dtype", "entropy_source",
                                                 "token_level", "batch_tokens")}
    assert inspect.signature(empg.audit).parameters["top"].default == 5
    assert list(inspect.signature(empg.convert).parameters) == ["source", "from_", "options"]


def test_import_is_light() -> None:
    """`import empg_cli` loads neither torch nor matplotlib nor transformers: a trainer pays for what it uses."""
    script = ("import sys\nimport empg_cli\n"
              "heavy = [m for m in ('torch', 'matplotlib', 'transformers') if m in sys.modules]\n"
              "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- one table of bad inputs, for the CLI and the library --------------------------------------------------------

def _rows(**overrides) -> dict[str, list]:
    rows = {"group_id": ["g", "g", "g", "g"], "traj_id": ["a", "a", "b", "b"], "step": [0, 1, 0, 1],
            "prompt_ids": [[5, 6, 7], [5, 6, 7, 8, 9], [5, 6], [5, 6, 11]],
            "response_ids": [[8, 9], [11], [11], [13, 14]], "reward": [1.0, 1.0, 0.0, 0.0],
            "token_entropy": [[0.1, 0.2], [0.9], [1.5], [0.4, 0.3]], "advantage": [0.5, 0.5, -0.5, -0.5]}
    rows.update(overrides)
    return rows


def _without(name: str) -> dict[str, list]:
    return {k: v for k, v in _rows().items() if k != name}


# (id, rows, hyperparameters, fragments that both the CLI's error line and the library's message contain)
BAD = [
    ("missing-traj_id", _without("traj_id"), {}, ["required column 'traj_id' is missing"]),
    ("missing-reward", _without("reward"), {}, ["required column 'reward' is missing"]),
    ("reward-is-text", _rows(reward=["1", "1", "0", "0"]), {}, ["column 'reward'", "expected float64"]),
    ("null-traj_id", _rows(traj_id=["a", None, "b", "b"]), {}, ["column 'traj_id', row 1", "is null"]),
    ("null-step", _rows(step=[0, 1, None, 1]), {}, ["column 'step', row 2", "is null"]),
    ("nan-reward", _rows(reward=[1.0, 1.0, math.nan, 0.0]), {}, ["column 'reward', row 2", "must be a finite"]),
    ("unequal-reward", _rows(reward=[1.0, 0.5, 0.0, 0.0]), {},
     ["column 'reward', trajectory (run='default', iteration=0, group_id='g', traj_id='a'), row 0",
      "differs within this trajectory", "--reward-agg sum"]),
    ("null-rewards", _rows(reward=[1.0, 1.0, None, None]), {}, ["traj_id='b'", "row 2", "null on every step"]),
    ("step-gap", _rows(step=[0, 2, 0, 1]), {}, ["column 'step'", "traj_id='a'", "steps are 0, 2; expected 0..1"]),
    ("duplicate-step", _rows(step=[0, 0, 0, 1]), {}, ["column 'step'", "step 0 appears twice", "row 0"]),
    ("negative-step", _rows(step=[0, -1, 0, 1]), {}, ["column 'step', row 1", "0-based"]),
    ("negative-entropy", _rows(token_entropy=[[0.1, 0.2], [-0.3], [1.5], [0.4, 0.3]]), {},
     ["column 'token_entropy', row 1", "not a finite number >= 0"]),
    ("entropy-length", _rows(token_entropy=[[0.1, 0.2], [0.9], [1.5, 1.0], [0.4, 0.3]]), {},
     ["column 'token_entropy', row 2", "has 2 entropies for 1 response_ids"]),
    ("missing-entropy", _rows(token_entropy=[[0.1, 0.2], None, [1.5], [0.4, 0.3]]), {},
     ["column 'token_entropy', row 1", "no entropies on this row"]),
    ("column-without-advantage", _without("advantage"), {"estimator": "column"},
     ["--estimator column needs the column 'advantage'"]),
    ("advantage-differs", _rows(advantage=[0.5, 0.4, -0.5, -0.5]), {"estimator": "column"},
     ["column 'advantage', trajectory", "differs within this trajectory"]),
    ("unknown-batch-key", _rows(), {"batch_key": "shard"}, ["--batch-key column 'shard' is not in"]),
    ("negative-k", _rows(), {"k": -1.0}, ["--k must be >= 0; got -1.0"]),
    ("negative-aem-min-range", _rows(), {"aem_min_range": -0.1}, ["--aem-min-range must be >= 0; got -0.1"]),
    ("zero-aem-tau", _rows(), {"aem_tau": 0.0}, ["--aem-tau must be > 0"]),
    ("unknown-estimator", _rows(), {"estimator": "ppo"}, ["grpo", "drgrpo", "rloo"]),
]


def _flags(hyperparameters: dict) -> list[str]:
    return [part for name, value in hyperparameters.items() for part in (f"--{name.replace('_', '-')}", str(value))]


def _table(rows: dict[str, list]) -> pa.Table:
    types = {"step": pa.int64(), "prompt_ids": pa.list_(pa.int32()), "response_ids": pa.list_(pa.int32()),
             "reward": pa.string() if isinstance(rows.get("reward", [0.0])[0], str) else pa.float64(),
             "token_entropy": pa.list_(pa.float32()), "advantage": pa.float64()}
    return pa.table({k: pa.array(v, types.get(k)) for k, v in rows.items()})


@pytest.mark.parametrize("case, rows, hyperparameters, fragments", BAD, ids=[c[0] for c in BAD])
def test_bad_input_fails_alike_in_the_cli_and_the_library(tmp_path, capsys, case, rows, hyperparameters, fragments):
    src = tmp_path / "runs.parquet"
    pq.write_table(_table(rows), src)
    code = main(["score", str(src), "--entropy-source", "logged", *_flags(hyperparameters)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    with pytest.raises(empg.EmpgError) as caught:
        empg.compute_advantages(pl.from_arrow(_table(rows)), **hyperparameters)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in err, (fragment, err)
        assert fragment in message, (fragment, message)
    if isinstance(caught.value, empg.BadInput):
        assert str(src) in err and message.startswith("frame")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.parquet"]


def test_step_entropy_must_be_finite_and_not_negative() -> None:
    frame = pl.from_arrow(_table(_without("token_entropy"))).with_columns(step_entropy=pl.Series([0.1, None, 0.3, 0.2]))
    with pytest.raises(empg.BadInput, match=r"frame: column 'step_entropy', row 1: step_entropy is null; must be a finite number >= 0"):
        empg.compute_advantages(frame)
    with pytest.raises(empg.BadInput, match="needs the column 'step_entropy'"):
        empg.compute_advantages(frame.drop("step_entropy"))


# --- the same results as the CLI -----------------------------------------------------------------------------------

def test_compute_advantages_on_logged_entropies_equals_empg_score(tmp_path, capsys):
    """A frame with only keys, rewards and token_entropy (no text) gets what `empg score --entropy-source logged`
    writes, in the frame's row order; its own columns come back untouched."""
    rng = np.random.default_rng(5)
    rows = random_rollouts(rng, last_step_reward=True)
    rows["token_entropy"] = [list(rng.uniform(0, 3, size=len(r)).astype(np.float32)) for r in rows["response_ids"]]
    src = write_rollouts(tmp_path / "in.parquet", rows)
    hyper = {"k": 2.0, "zeta": 0.3, "aem_min_range": 0.05, "estimator": "rloo"}
    assert main(["score", str(src), "--entropy-source", "logged", *_flags(hyper)]) == 0, capsys.readouterr().err
    written = pl.read_parquet(tmp_path / "in.scored.parquet")
    given = pl.read_parquet(src).drop("prompt_ids", "response_ids")
    got = empg.compute_advantages(given, **hyper)
    assert got.columns == [*given.columns, "step_entropy", *ADVANTAGE_COLUMNS]
    assert_frame_equal(got.select(given.columns), given)
    assert_frame_equal(got.select("step_entropy", *ADVANTAGE_COLUMNS),
                       written.select("step_entropy", *ADVANTAGE_COLUMNS), abs_tol=1e-12, rel_tol=1e-12)


def test_score_in_memory_equals_score_file(tmp_path, tiny_model_dir):
    rows = random_rollouts(np.random.default_rng(6))
    src = write_rollouts(tmp_path / "in.parquet", rows)
    out = tmp_path / "out.parquet"
    score_file(src, out, ScoreConfig(model=str(tiny_model_dir)), AdvantageConfig(zeta=0.2))
    want = pl.read_parquet(out)
    for source in (src, str(src), pl.read_parquet(src)):
        got = empg.score(source, model=str(tiny_model_dir), zeta=0.2)
        assert_frame_equal(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "out.parquet"]
    with pytest.raises(empg.BadUsage, match="unknown hyperparameter 'kk'"):
        empg.score(src, model=str(tiny_model_dir), kk=1.0)
    with pytest.raises(empg.BadUsage, match="^--workers and --ray-address need --engine ray$"):
        empg.score(src, model=str(tiny_model_dir), workers=2)  # the engine options reach score_file
    with pytest.raises(empg.BadUsage, match="^no model: pass --model .*; frame names none"):
        empg.score(pl.read_parquet(src))
    with pytest.raises(empg.BadInput, match=r"^frame: column 'step', trajectory .*expected 0\.\.") as caught:
        empg.score(pl.read_parquet(src).with_columns(step=pl.col("step") * 2), model=str(tiny_model_dir))
    assert "empg-" not in str(caught.value)


def test_read_rollouts_and_load_scored(tmp_path, capsys):
    rng = np.random.default_rng(7)
    rows = random_rollouts(rng)
    rows["token_entropy"] = [list(rng.uniform(0, 3, size=len(r)).astype(np.float32)) for r in rows["response_ids"]]
    src = write_rollouts(tmp_path / "in.parquet", rows)
    assert_frame_equal(empg.read_rollouts(src), pl.read_parquet(src))
    bad = write_rollouts(tmp_path / "bad.parquet", {**rows, "step": [s + 1 for s in rows["step"]]})
    with pytest.raises(empg.BadInput, match=f"^{bad}: column 'step'"):
        empg.read_rollouts(bad)
    assert main(["score", str(src), "--entropy-source", "logged"]) == 0, capsys.readouterr().err
    scored = tmp_path / "in.scored.parquet"
    one, listed = empg.load_scored(scored), empg.load_scored([str(scored)])
    assert_frame_equal(one, listed)
    assert one.height == len(rows["step"]) and one["adv_empg"].to_list() == pl.read_parquet(scored)["adv_empg"].to_list()


def test_audit_of_a_frame_equals_audit_of_its_file(tmp_path, capsys):
    """The report of `empg audit --format json`, from the file or from the frame read from it."""
    import json
    rng = np.random.default_rng(8)
    rows = random_rollouts(rng, groups=5)
    rows["token_entropy"] = [list(rng.uniform(0, 3, size=len(r)).astype(np.float32)) for r in rows["response_ids"]]
    src = write_rollouts(tmp_path / "in.parquet", rows)
    assert main(["score", str(src), "--entropy-source", "logged"]) == 0
    scored = tmp_path / "in.scored.parquet"
    capsys.readouterr()
    assert main(["audit", str(scored), "--format", "json", "--top", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert empg.audit(scored, top=3) == printed
    from_frame = empg.audit(pl.read_parquet(scored), top=3)
    assert from_frame == printed
    advantages_only = empg.compute_advantages(pl.read_parquet(src).drop("prompt_ids", "response_ids"))
    report = empg.audit(advantages_only)
    assert [i["passed"] for i in report["invariants"]] == [True, True, True]
    assert report["model_statistics"] is False


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from("ab"), st.sampled_from("xy"), st.integers(-1, 3),
                                st.sampled_from([0.0, 1.0, None, math.nan, math.inf])), min_size=1, max_size=12),
       reward_agg=st.sampled_from(["equal", "sum"]), column=st.booleans(), tidy=st.booleans())
def test_the_one_group_by_check_agrees_with_the_detailed_checks(steps, reward_agg, column, tidy) -> None:
    """Valid keys skip the detailed checks (validation._all_trajectories_valid); it must accept exactly what they
    accept, or a bad file would pass, or a good one be refused. `tidy` numbers each trajectory's steps 0, 1, ...
    in row order and keeps only rewards 0 and 1 (no nulls: a column without them takes another path), so that
    rewards differing within a valid trajectory are common."""
    if tidy:
        seen: dict[tuple, int] = {}
        renumbered = []
        for g, t, _, r in steps:
            renumbered.append((g, t, seen.get((g, t), 0), float(r == 1.0)))
            seen[(g, t)] = seen.get((g, t), 0) + 1
        steps = renumbered
    from empg_cli import validation
    from empg_cli.advantages import trajectory_structure
    frame = pl.DataFrame({"group_id": [g for g, _, _, _ in steps], "traj_id": [t for _, t, _, _ in steps],
                          "step": [s for _, _, s, _ in steps], "reward": [r for _, _, _, r in steps]},
                         schema={"group_id": pl.String, "traj_id": pl.String, "step": pl.Int64, "reward": pl.Float64})
    frame = frame.with_columns(advantage=pl.col("reward"))
    problems = validation.Problems("frame")
    keys = validation.key_frame(frame.to_arrow(), problems, ())
    structure = trajectory_structure(keys, ["run", "iteration"])
    values = {"reward": reward_agg, **({"advantage": None} if column else {})}
    validation.check_steps(keys, problems)
    for name, agg in values.items():
        validation.check_value_per_trajectory(keys, problems, name, agg)
    detailed = problems.total == 0
    assert validation._all_trajectories_valid(keys, structure, values) == detailed
