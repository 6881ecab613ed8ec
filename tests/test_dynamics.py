"""dynamics: every number behind the plots and the audit against a plain-Python / numpy reference on random data."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from empg_cli import dynamics
from empg_cli.advantages import advantage_table
from empg_cli.config import AdvantageConfig, config_to_dict
from empg_cli.errors import BadInput

WORDS = "look take go open north south key door lamp inventory examine drop".split()


def scored_steps(seed: int = 0, runs: tuple[str, ...] = ("a", "b"), iterations: int = 4, groups: int = 3,
                 trajs: int = 4, max_steps: int = 6, logged: bool = False,
                 cfg: AdvantageConfig = AdvantageConfig()) -> pl.DataFrame:
    """A scored table (`empg schema scored` columns) of random ragged trajectories, rows shuffled.

    Entropies are rounded to 0.01 nats so that ties occur; group g0 of iteration 0 is flat (one entropy) and some
    groups have equal rewards (A_i = 0), the degenerate cases of docs/method.md.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for run in runs:
        for it in range(iterations):
            for g in range(groups):
                for t in range(trajs):
                    reward = float(rng.choice([0.0, 1.0])) if g != 1 else 1.0
                    for step in range(int(rng.integers(1, max_steps + 1))):
                        h = 0.5 if (it, g) == (0, 0) else round(float(rng.gamma(2.0, 0.4)) / (1 + 0.2 * it), 2)
                        text = f"step {step}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 30))))
                        rows.append({"run": run, "iteration": it, "group_id": f"g{g}", "traj_id": f"t{t}",
                                     "step": step, "reward": reward, "response": text, "step_entropy": h})
    frame = pl.DataFrame(rows).sample(fraction=1.0, shuffle=True, seed=seed)
    h = frame["step_entropy"].to_numpy()
    renyi2 = h * rng.uniform(0.4, 0.9, size=len(h))
    expected = 1 - np.exp(-renyi2)
    model = {"step_renyi2": renyi2, "step_logprob": -h * 3,
             "step_grad_norm_sq": np.clip(expected + rng.normal(0, 0.1, size=len(h)), 0, 2),
             "step_grad_norm_sq_expected": expected}
    frame = frame.with_columns(n_response_tokens=pl.lit(12, pl.Int32),
                               **{k: pl.lit(None, pl.Float64) if logged else pl.Series(v) for k, v in model.items()})
    columns = ["run", "iteration", "group_id", "traj_id", "step", "reward", "response", "n_response_tokens",
               "step_entropy", *model]
    return pl.concat([frame.select(columns), advantage_table(frame, cfg)], how="horizontal")


def write_scored(path: Path, frame: pl.DataFrame, cfg: AdvantageConfig = AdvantageConfig()) -> Path:
    """The frame as Parquet with `empg` metadata naming the advantage config (as `empg score` writes it)."""
    metadata = {b"empg": json.dumps({"advantages": config_to_dict(cfg)}).encode()}
    pq.write_table(frame.to_arrow().replace_schema_metadata(metadata), path)
    return path


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    return dynamics.load_scored([write_scored(tmp_path_factory.mktemp("d") / "runs.scored.parquet", scored_steps())])


def records(frame: pl.DataFrame) -> list[dict]:
    return frame.with_columns(pl.col(pl.Enum).cast(pl.String)).to_dicts()


def by(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def assert_summary(table: pl.DataFrame, groups: dict[tuple, list[float]], keys: list[str]) -> None:
    """Each table row is n, mean, q25, q75 of the matching group's values."""
    got = {tuple(r[k] for k in keys): r for r in records(table)}
    assert set(got) == set(groups)
    for key, values in groups.items():
        v = np.array(values, dtype=np.float64)
        row = got[key]
        assert row["n"] == len(v)
        assert row["mean"] == pytest.approx(sum(values) / len(values), rel=1e-12)
        assert (row["q25"], row["q75"]) == pytest.approx(tuple(np.percentile(v, [25, 75])), rel=1e-12)


def test_entropy_drift_splits_success_and_failure_per_iteration(steps: pl.DataFrame) -> None:
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records(steps):
        outcome = "success" if r["traj_reward"] > 0 else "failure"
        groups[(r["source"], r["iteration"], outcome)].append(r["step_entropy"])
    assert_summary(dynamics.entropy_drift(steps), groups, ["source", "iteration", "outcome"])


def test_entropy_by_position_uses_thirds_of_each_trajectory(steps: pl.DataFrame) -> None:
    rows = records(steps)
    length = {k: len(v) for k, v in by(rows, *dynamics.TRAJ).items()}
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        t, n = r["step"], length[tuple(r[k] for k in dynamics.TRAJ)]
        position = "early" if t < n / 3 else "middle" if t < 2 * n / 3 else "late"
        groups[(r["source"], r["iteration"], position)].append(r["step_entropy"])
    assert_summary(dynamics.entropy_by_position(steps), groups, ["source", "iteration", "position"])


@pytest.mark.parametrize(("length", "expected"), [(1, ["early"]), (2, ["early", "middle"]),
                                                  (3, ["early", "middle", "late"]),
                                                  (6, ["early", "early", "middle", "middle", "late", "late"])])
def test_position_of_short_trajectories(length: int, expected: list[str]) -> None:
    frame = pl.DataFrame({"source": "a", "iteration": 0, "group_id": "g", "traj_id": "t", "step": list(range(length))})
    assert frame.select(dynamics.position_in_trajectory())["position"].cast(pl.String).to_list() == expected


def test_grad_norm_by_iteration(steps: pl.DataFrame) -> None:
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records(steps):
        groups[(r["source"], r["iteration"])].append(r["step_grad_norm_sq"])
    assert_summary(dynamics.grad_norm_by_iteration(steps), groups, ["source", "iteration"])


def test_entropy_deciles_bin_means_and_update_magnitudes(steps: pl.DataFrame) -> None:
    table = {(r["source"], r["decile"]): r for r in records(dynamics.entropy_deciles(steps))}
    for source, rows in by(records(steps), "source").items():
        h = np.array([r["step_entropy"] for r in rows])
        edges = np.percentile(h, np.arange(10, 100, 10))
        decile = np.searchsorted(edges, h, side="left") + 1  # number of edges strictly below h, plus 1
        assert {d for (s, d) in table if s == source[0]} == set(decile.tolist())
        for d in set(decile.tolist()):
            members = [r for r, dd in zip(rows, decile) if dd == d]
            row = table[(source[0], d)]
            assert row["n"] == len(members)
            assert (row["entropy_min"], row["entropy_max"]) == (min(m["step_entropy"] for m in members),
                                                                max(m["step_entropy"] for m in members))
            assert row["grad_norm_sq_mean"] == pytest.approx(np.mean([m["step_grad_norm_sq"] for m in members]))
            assert row["grad_norm_sq_expected_mean"] == pytest.approx(
                np.mean([m["step_grad_norm_sq_expected"] for m in members]))
            for name, col in (("base", "adv_base"), ("empg", "adv_empg"), ("aem", "adv_aem")):
                magnitude = [abs(m[col]) * m["step_grad_norm_sq"] ** 0.5 for m in members]
                assert row[f"update_{name}"] == pytest.approx(sum(magnitude) / len(magnitude), rel=1e-12)


def test_deciles_of_tied_and_flat_entropies() -> None:
    flat = pl.DataFrame({"source": ["a"] * 7, "step_entropy": [0.3] * 7})
    assert flat.select(dynamics.entropy_decile())["decile"].to_list() == [1] * 7
    ramp = pl.DataFrame({"source": ["a"] * 11, "step_entropy": [float(i) for i in range(11)]})
    # q_{k/10} = k exactly, so step i lies in (i-1, i]: decile max(i, 1)
    assert ramp.select(dynamics.entropy_decile())["decile"].to_list() == [1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


def reference_quadrants(rows: list[dict]) -> dict[tuple, dict]:
    out = {}
    for (batch,), members in by(rows, "batch").items():
        hn = np.array([m["empg_h_norm"] for m in members])
        lo, hi = np.quantile(hn, 1 / 3), np.quantile(hn, 2 / 3)
        for certainty in ("confident", "uncertain"):
            for outcome in ("success", "failure"):
                cell = [m for m in members
                        if (m["empg_h_norm"] <= lo if certainty == "confident" else m["empg_h_norm"] > hi)
                        and (m["traj_reward"] > 0) == (outcome == "success")]
                means = {e: float(np.mean([abs(m[f"adv_{e}"]) for m in cell])) if cell else None
                         for e in ("base", "empg", "aem")}
                out[(batch, certainty, outcome)] = {"n_steps": len(cell), **means}
    return out


def test_quadrants_counts_means_and_amplification(steps: pl.DataFrame) -> None:
    expected = reference_quadrants(records(steps))
    got = records(dynamics.quadrants(steps))
    assert {(r["batch"], r["certainty"], r["outcome"]) for r in got} == set(expected)
    assert sum(r["n_steps"] for r in got) > 0.5 * steps.height
    for r in got:
        ref = expected[(r["batch"], r["certainty"], r["outcome"])]
        assert r["n_steps"] == ref["n_steps"]
        for e in ("base", "empg", "aem"):
            assert r[f"mean_abs_adv_{e}"] == (None if ref[e] is None else pytest.approx(ref[e], rel=1e-12))
        for e in ("empg", "aem"):
            ratio = ref[e] / ref["base"] if ref["base"] else None
            assert r[f"amplification_{e}"] == (None if ratio is None else pytest.approx(ratio, rel=1e-12))


def test_top_steps_are_extreme_entropies_of_the_right_outcome(steps: pl.DataFrame) -> None:
    rows = records(steps)
    key = [*dynamics.TRAJ, "step"]
    failed = sorted((r for r in rows if not r["traj_reward"] > 0),
                    key=lambda r: (r["step_entropy"], *(r[k] for k in key)))
    won = sorted((r for r in rows if r["traj_reward"] > 0), key=lambda r: (-r["step_entropy"], *(r[k] for k in key)))
    for outcome, ref in (("failure", failed), ("success", won)):
        got = records(dynamics.top_steps(steps, 7, outcome))
        assert [tuple(g[k] for k in key) for g in got] == [tuple(r[k] for k in key) for r in ref[:7]]
        assert [g["text"] for g in got] == [r["text"] for r in ref[:7]]
    assert dynamics.top_steps(steps, 0, "failure").height == 0


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    out = np.empty(len(x))
    for i, v in enumerate(x):
        below, equal = sum(1 for w in x if w < v), sum(1 for w in x if w == v)
        out[i] = below + (equal + 1) / 2
    return out


def test_correlations_before_and_after_modulation(steps: pl.DataFrame) -> None:
    got = {(r["source"], r["quantity"]): r for r in records(dynamics.correlations(steps))}
    for (source,), rows in by(records(steps), "source").items():
        h = np.array([r["step_entropy"] for r in rows])
        norm = np.sqrt([r["step_grad_norm_sq"] for r in rows])
        quantities = {"grad_norm": norm, **{f"update_{e}": np.abs([r[f"adv_{e}"] for r in rows]) * norm
                                            for e in ("base", "empg", "aem")}}
        for name, q in quantities.items():
            row = got[(source, name)]
            assert row["n_steps"] == len(rows)
            assert row["pearson"] == pytest.approx(np.corrcoef(h, q)[0, 1], rel=1e-9)
            assert row["spearman"] == pytest.approx(np.corrcoef(ranks(h), ranks(q))[0, 1], rel=1e-9)


def test_correlations_are_null_without_model_statistics(tmp_path: Path) -> None:
    frame = dynamics.load_scored([write_scored(tmp_path / "l.parquet", scored_steps(logged=True, iterations=1))])
    assert not dynamics.has_model_statistics(frame)
    table = dynamics.correlations(frame)
    assert table.height == 8 and table["n_steps"].to_list() == [0] * 8
    assert table["pearson"].null_count() == table["spearman"].null_count() == 8
    assert dynamics.entropy_deciles(frame)["update_empg"].null_count() == dynamics.entropy_deciles(frame).height


def test_invariants_hold_on_scored_data_and_match_a_loop(steps: pl.DataFrame) -> None:
    rows = records(steps)
    dev_g = [abs(np.mean([r["empg_g"] for r in m]) - 1) for m in by(rows, "batch").values()]
    dev_a = [abs(np.mean([r["adv_empg"] for r in m])) for m in by(rows, "batch").values()]
    groups = [m for m in by(rows, *dynamics.GROUP).values()
              if max(r["step_entropy"] for r in m) - min(r["step_entropy"] for r in m) >= 0.1]  # delta, default
    dev_w = [abs(np.mean([r["aem_w"] for r in m]) - 1) for m in groups]
    got = records(dynamics.invariants(steps))
    assert [g["name"] for g in got] == ["mean_B empg_g = 1", "mean_B adv_empg = 0",
                                        "mean_G aem_w = 1 (non-flat groups)"]
    assert [g["n_checked"] for g in got] == [8, 8, len(groups)] and len(groups) == 22  # 2 runs x 4 x 3, less 2 flat
    for g, dev in zip(got, (dev_g, dev_a, dev_w)):
        assert g["max_abs_deviation"] == pytest.approx(max(dev), abs=1e-15)
        assert g["passed"] and g["tolerance"] == 1e-6


def test_invariant_checks_groups_spanning_the_files_delta(tmp_path: Path) -> None:
    """The AEM check reads delta from the file's metadata: at delta = 1.5 nats most groups keep w = 1 by rule and are
    not checked; each group checked spans at least delta."""
    cfg = AdvantageConfig(aem_min_range=1.5)
    frame = dynamics.load_scored([write_scored(tmp_path / "wide.scored.parquet", scored_steps(cfg=cfg), cfg)])
    spreads = frame.group_by(dynamics.GROUP).agg(spread=pl.col("step_entropy").max() - pl.col("step_entropy").min(),
                                                 w=pl.col("aem_w"))
    wide = spreads.filter(pl.col("spread") >= 1.5)
    assert 0 < wide.height < spreads.height
    assert all(w == [1.0] * len(w) for w in spreads.filter(pl.col("spread") < 1.5)["w"].to_list())
    check = records(dynamics.invariants(frame))[2]
    assert check["n_checked"] == wide.height and check["passed"]


def test_invariants_fail_on_a_tampered_batch(steps: pl.DataFrame) -> None:
    first = steps["batch"][0]
    tampered = steps.with_columns(pl.when(pl.col("batch") == first).then(pl.col("adv_empg") + 0.01)
                                  .otherwise(pl.col("adv_empg")).alias("adv_empg"))
    got = records(dynamics.invariants(tampered))
    assert [g["passed"] for g in got] == [True, False, True]
    assert got[1]["max_abs_deviation"] == pytest.approx(0.01, rel=1e-6)


def test_results_do_not_depend_on_row_order(steps: pl.DataFrame) -> None:
    shuffled = steps.sample(fraction=1.0, shuffle=True, seed=7)
    for fn in (dynamics.entropy_drift, dynamics.entropy_by_position, dynamics.entropy_deciles, dynamics.quadrants,
               dynamics.correlations, dynamics.invariants):
        assert_frame_equal(fn(shuffled), fn(steps), rel_tol=1e-9, abs_tol=1e-12)  # sums differ by round-off


def test_load_scored_labels_runs_batches_and_text(tmp_path: Path) -> None:
    one = write_scored(tmp_path / "one.parquet", scored_steps(seed=1, runs=("a", "shared"), iterations=2))
    two = write_scored(tmp_path / "two.parquet", scored_steps(seed=2, runs=("shared",), iterations=1))
    frame = dynamics.load_scored([one, two])
    assert frame["source"].dtype == pl.Enum(["a", "one:shared", "two:shared"])
    assert frame["batch"].cast(pl.String).unique().sort().to_list() == [
        "one: run=a, iteration=0", "one: run=a, iteration=1", "one: run=shared, iteration=0",
        "one: run=shared, iteration=1", "two: run=shared, iteration=0"]
    assert frame.filter(pl.col("source") == "two:shared").height == pl.read_parquet(two).height
    assert frame["text"].str.starts_with("step ").all()


def test_load_scored_fills_defaults_and_uses_the_stored_batch_key(tmp_path: Path) -> None:
    cfg = AdvantageConfig(batch_key=("iteration", "group_id"))
    data = scored_steps(runs=("x",), iterations=2, cfg=cfg).drop("run", "response")
    frame = dynamics.load_scored([write_scored(tmp_path / "s.parquet", data, cfg)])
    assert frame["run"].unique().to_list() == ["default"]
    assert frame["source"].cast(pl.String).unique().to_list() == ["default"]
    assert frame["batch"].dtype == pl.Enum([f"iteration={i}, group_id=g{g}" for i in range(2) for g in range(3)])
    assert frame["text"].null_count() == frame.height
    assert all(r["passed"] for r in dynamics.invariants(frame).to_dicts())

    no_iteration = scored_steps(runs=("x",), iterations=1).drop("iteration")
    frame = dynamics.load_scored([write_scored(tmp_path / "n.parquet", no_iteration)])
    assert frame["iteration"].dtype == pl.Int64 and frame["iteration"].unique().to_list() == [0]


def test_load_scored_rejects_files_that_are_not_scored(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no such file"):
        dynamics.load_scored([tmp_path / "missing.parquet"])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BadInput, match="is not a Parquet file"):
        dynamics.load_scored([tmp_path / "notes.txt"])
    path = write_scored(tmp_path / "raw.parquet", scored_steps(iterations=1).drop("adv_aem"))
    with pytest.raises(BadInput, match="column 'adv_aem': is missing; this is not a scored file") as info:
        dynamics.load_scored([path])
    assert info.value.column == "adv_aem"
    cfg = AdvantageConfig(batch_key=("iteration", "env"))
    path = write_scored(tmp_path / "key.parquet", scored_steps(iterations=1), cfg)
    with pytest.raises(BadInput, match="column 'env': is the batch key"):
        dynamics.load_scored([path])
    nulls = scored_steps(iterations=1).with_columns(pl.when(pl.col("step") == 0).then(None)
                                                    .otherwise(pl.col("adv_base")).alias("adv_base"))
    with pytest.raises(BadInput, match="column 'adv_base', row"):
        dynamics.load_scored([write_scored(tmp_path / "nulls.parquet", nulls)])
