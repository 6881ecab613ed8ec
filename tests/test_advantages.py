"""The library's compute_advantages against the loop references of tests/reference.py and the invariants of
docs/method.md."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import empg_cli as empg
from empg_cli.advantages import ADVANTAGE_COLUMNS
from empg_cli.config import EPS_RANGE, EPS_STD

try:
    from . import reference as ref
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import reference as ref

ESTIMATORS = ["grpo", "drgrpo", "rloo", "reinforce", "column"]
ATOL = 1e-9
SCHEMA = {"run": pl.String, "iteration": pl.Int64, "group_id": pl.String, "traj_id": pl.String, "step": pl.Int64,
          "reward": pl.Float64, "step_entropy": pl.Float64, "advantage": pl.Float64, "shard": pl.String}
EMPG_COLUMNS = ["empg_h_norm", "empg_g", "empg_f_next", "adv_empg"]
BASE_AND_AEM_COLUMNS = ["traj_reward", "adv_base", "aem_u_norm", "aem_w", "adv_aem"]


# --- data ---------------------------------------------------------------------------------------

LAYOUTS = ["shuffled", "log order", "trajectory blocks"]


def arrange(rows: list[dict], layout: str, permutation) -> list[dict]:
    """Rows (generated in log order: batch, group, trajectory, step) in one of the orders files come in: as
    logged, whole trajectories in a shuffled order, or every row shuffled. `permutation(n)` shuffles range(n)."""
    if layout == "log order":
        return rows
    if layout == "shuffled":
        return [rows[i] for i in permutation(len(rows))]
    trajectories = list(by_key(rows, lambda r: (*group_of(r), r["traj_id"])).values())
    return [rows[i] for t in permutation(len(trajectories)) for i in trajectories[t]]


def random_rollouts(seed: int, *, n_batches: int = 4, flat_batch: bool = True, layout: str = "shuffled") -> list[dict]:
    """Ragged step rows: several runs and iterations, groups of 1..5 trajectories of 1..6 steps, in `layout`.

    Group and trajectory ids repeat across batches and groups (keys must be composite); rewards sit on every
    step of some trajectories and on the last step only of others; entropies have ties, and one batch is flat.
    """
    rng = random.Random(seed)
    batches = rng.sample([(run, it) for run in ("r0", "r1", "r2") for it in (0, 1, 5)], n_batches)
    rows = []
    for b, (run, iteration) in enumerate(batches):
        flat = flat_batch and b == 0
        for g in range(rng.randint(1, 4)):
            n_traj = rng.randint(1, 5)
            for t in range(n_traj):
                reward = rng.choice([0.0, 1.0, 1.0, 0.5, -1.0, round(rng.uniform(-2, 2), 6)])
                last_only = rng.random() < 0.5
                advantage = rng.gauss(0, 1)
                length = rng.randint(1, 6)
                for step in range(length):
                    entropy = 1.25 if flat else rng.choice([0.0, 0.7, 2.0, rng.uniform(0, 4), rng.uniform(0, 4)])
                    rows.append({"run": run, "iteration": iteration, "group_id": f"g{g}", "traj_id": f"t{t}",
                                 "step": step, "reward": None if last_only and step < length - 1 else reward,
                                 "step_entropy": entropy, "advantage": advantage, "shard": rng.choice("ab")})
    return arrange(rows, layout, lambda n: rng.sample(range(n), n))


@st.composite
def rollouts(draw: st.DrawFn, *, flat_entropy: bool = False, max_batches: int = 3) -> list[dict]:
    """Hypothesis version of random_rollouts; `flat_entropy` gives every step of a batch the same entropy."""
    pairs = draw(st.lists(st.tuples(st.sampled_from(["r0", "r1"]), st.integers(0, 2)),
                          min_size=1, max_size=max_batches, unique=True))
    reward = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5]), st.floats(-3, 3, allow_subnormal=False))
    entropy = st.one_of(st.sampled_from([0.0, 0.5, 2.0]), st.floats(0, 6, allow_subnormal=False))
    rows = []
    for run, iteration in pairs:
        batch_entropy = draw(entropy)
        for g in range(draw(st.integers(1, 3))):
            for t in range(draw(st.integers(1, 5))):
                r, last_only, length = draw(reward), draw(st.booleans()), draw(st.integers(1, 6))
                for step in range(length):
                    rows.append({"run": run, "iteration": iteration, "group_id": f"g{g}", "traj_id": f"t{t}",
                                 "step": step, "reward": None if last_only and step < length - 1 else r,
                                 "step_entropy": batch_entropy if flat_entropy else draw(entropy),
                                 "advantage": 0.0, "shard": "a"})
    return arrange(rows, draw(st.sampled_from(LAYOUTS)), lambda n: draw(st.permutations(range(n))))


def frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=SCHEMA)


def library(rows: list[dict], **cfg) -> list[dict]:
    """The advantage columns of empg.compute_advantages as one dict per input row; the input comes back unchanged,
    rows in their order, the advantage columns appended."""
    given = frame(rows)
    out = empg.compute_advantages(given, **cfg)
    assert out.columns == given.columns + ADVANTAGE_COLUMNS
    assert out.select(given.columns).equals(given)
    adv = out.select(ADVANTAGE_COLUMNS)
    assert all(dtype == pl.Float64 for dtype in adv.dtypes)
    return adv.to_dicts()


def max_abs_errors(got: list[dict], want: list[dict], columns: list[str]) -> dict[str, float]:
    return {c: max((abs(g[c] - w[c]) if g[c] is not None else math.inf for g, w in zip(got, want)), default=0.0)
            for c in columns}


def assert_matches_reference(rows: list[dict], columns: list[str], **cfg) -> None:
    ref_cfg = {k: (tuple(v) if k == "batch_key" else v) for k, v in cfg.items()}
    errors = max_abs_errors(library(rows, **cfg), ref.advantages_ref(rows, **ref_cfg), columns)
    bad = {c: e for c, e in errors.items() if not e <= ATOL}
    assert not bad, f"columns off the float64 reference (largest |error|): {bad}"


def by_key(rows: list[dict], key) -> dict[tuple, list[int]]:
    out = defaultdict(list)
    for i, r in enumerate(rows):
        out[key(r)].append(i)
    return out


def batch_of(r: dict) -> tuple:
    return (r["run"], r["iteration"])


def group_of(r: dict) -> tuple:
    return (r["run"], r["iteration"], r["group_id"])


NON_DEFAULT = {"k": 2.5, "k_future": 0.5, "zeta": 0.7, "aem_tau": 0.3, "aem_min_range": 0.8}


# --- against the reference ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reward_agg", ["equal", "sum"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_base_advantage_and_aem_match_reference(estimator: str, reward_agg: str, seed: int) -> None:
    rows = random_rollouts(seed)
    assert_matches_reference(rows, BASE_AND_AEM_COLUMNS, estimator=estimator, reward_agg=reward_agg)
    assert_matches_reference(rows, BASE_AND_AEM_COLUMNS, estimator=estimator, reward_agg=reward_agg, aem_tau=0.3)
    for delta in (0.0, 1.0):
        assert_matches_reference(rows, BASE_AND_AEM_COLUMNS, estimator=estimator, reward_agg=reward_agg,
                                 aem_min_range=delta)


@pytest.mark.parametrize("empg_norm", ["mean", "meanstd"])
@pytest.mark.parametrize("reward_agg", ["equal", "sum"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_empg_without_future_bonus_matches_reference(estimator: str, reward_agg: str, empg_norm: str) -> None:
    """zeta = 0 leaves f_next out of A_empg: checks H_norm, g and the batch normalisation on their own."""
    for seed in range(3):
        rows = random_rollouts(seed)
        for k in (1.0, 2.5):
            assert_matches_reference(rows, ["empg_h_norm", "empg_g", "adv_empg"], estimator=estimator,
                                     reward_agg=reward_agg, empg_norm=empg_norm, k=k, zeta=0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k_future", [1.0, 0.5])
def test_f_next_matches_reference(k_future: float, seed: int) -> None:
    assert_matches_reference(random_rollouts(seed), ["empg_f_next"], k_future=k_future)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("empg_norm", ["mean", "meanstd"])
@pytest.mark.parametrize("reward_agg", ["equal", "sum"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_all_columns_match_reference(estimator: str, reward_agg: str, empg_norm: str, layout: str) -> None:
    for seed in range(3):
        rows = random_rollouts(seed, layout=layout)
        assert_matches_reference(rows, ADVANTAGE_COLUMNS, estimator=estimator, reward_agg=reward_agg,
                                 empg_norm=empg_norm)
        assert_matches_reference(rows, ADVANTAGE_COLUMNS, estimator=estimator, reward_agg=reward_agg,
                                 empg_norm=empg_norm, **NON_DEFAULT)


def test_f_next_uses_the_batch_normalised_entropy_of_the_next_step() -> None:
    """Minimal case worked by hand from docs/method.md (EMPG): one batch, entropies 0, 1 (traj a) and 2, 4 (traj b).

    H_norm = H / (4 + 1e-8) over the batch, so f_next(a, step 0) = exp(-H_norm(a, step 1)) = exp(-1/(4 + 1e-8)),
    not exp(-1), which is what normalising within the trajectory would give.
    """
    rows = [{"run": "r", "iteration": 0, "group_id": "g", "traj_id": traj, "step": step, "reward": reward,
             "step_entropy": h, "advantage": 0.0, "shard": "a"}
            for traj, step, reward, h in (("a", 0, 1.0, 0.0), ("a", 1, 1.0, 1.0), ("b", 0, 0.0, 2.0), ("b", 1, 0.0, 4.0))]
    got = [r["empg_f_next"] for r in library(rows)]
    want = [math.exp(-1.0 / (4.0 + EPS_RANGE)), 0.0, math.exp(-4.0 / (4.0 + EPS_RANGE)), 0.0]
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_other_batch_key_matches_reference(estimator: str) -> None:
    rows = random_rollouts(3, n_batches=5)
    for key in (["run"], ["shard"], ["run", "shard"]):
        assert_matches_reference(rows, ["empg_h_norm", "empg_g", "adv_empg"], estimator=estimator, zeta=0.0,
                                 batch_key=key)
        assert_matches_reference(rows, ADVANTAGE_COLUMNS, estimator=estimator, batch_key=key)


def test_run_batch_key_normalises_across_iterations() -> None:
    rows = random_rollouts(4, n_batches=5)
    out = library(rows, batch_key=("run",))
    for members in by_key(rows, lambda r: r["run"]).values():
        assert math.fsum(out[i]["empg_g"] for i in members) / len(members) == pytest.approx(1.0, abs=1e-12)
        assert min(out[i]["empg_h_norm"] for i in members) == 0.0
    # the default key gives each (run, iteration) its own minimum; the run-wide key does not
    default = library(rows)
    assert any(abs(a["empg_h_norm"] - b["empg_h_norm"]) > 1e-6 for a, b in zip(out, default))


# --- invariants of docs/method.md (hypothesis) ----------------------------------------------------------

DELTAS = st.sampled_from([0.0, 0.1, 1.5])


@settings(max_examples=60, deadline=None)
@given(rows=rollouts(), estimator=st.sampled_from(ESTIMATORS[:4]), empg_norm=st.sampled_from(["mean", "meanstd"]),
       k=st.floats(0, 4), tau=st.floats(0.1, 3), delta=DELTAS)
def test_batch_and_group_invariants(rows, estimator, empg_norm, k, tau, delta) -> None:
    out = library(rows, estimator=estimator, empg_norm=empg_norm, k=k, aem_tau=tau, aem_min_range=delta)
    for members in by_key(rows, batch_of).values():
        g = [out[i]["empg_g"] for i in members]
        a_empg = [out[i]["adv_empg"] for i in members]
        assert math.fsum(g) / len(g) == pytest.approx(1.0, abs=1e-12), "mean_B g = 1"
        scale = 1.0 + max(abs(out[i]["adv_base"]) * out[i]["empg_g"] for i in members)
        assert abs(math.fsum(a_empg) / len(a_empg)) <= 1e-9 * scale, "mean_B A_empg = 0"
        assert all(0.0 <= out[i]["empg_h_norm"] <= 1.0 for i in members)
    for members in by_key(rows, group_of).values():
        hs = [rows[i]["step_entropy"] for i in members]
        w = [out[i]["aem_w"] for i in members]
        spread = max(hs) - min(hs)
        if spread >= delta and spread > EPS_RANGE:
            assert math.fsum(w) / len(w) == pytest.approx(1.0, abs=1e-12), "mean_G w = 1"
            assert min(w) < 1.0 < max(w), "a group spanning at least delta is modulated"
        else:
            assert w == [1.0] * len(w), "a group spanning less than delta keeps w = 1"
        for i in members:
            assert out[i]["adv_aem"] == pytest.approx(out[i]["adv_base"] * out[i]["aem_w"], abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(rows=rollouts(flat_entropy=True), estimator=st.sampled_from(ESTIMATORS[:4]), k=st.floats(0, 4),
       tau=st.floats(0.1, 3), delta=DELTAS)
def test_zero_entropy_spread_gives_unit_weights(rows, estimator, k, tau, delta) -> None:
    out = library(rows, estimator=estimator, k=k, aem_tau=tau, aem_min_range=delta)
    for r in out:
        assert r["empg_g"] == pytest.approx(1.0, abs=1e-12)
        assert r["aem_w"] == 1.0
        assert r["adv_aem"] == r["adv_base"]


@settings(max_examples=50, deadline=None)
@given(rows=rollouts(), estimator=st.sampled_from(ESTIMATORS[:4]), k_future=st.floats(0, 4))
def test_no_modulation_is_batch_centred_base_advantage(rows, estimator, k_future) -> None:
    """k = zeta = 0: A_empg = A_i - mean_B A_i (mean over the batch's steps)."""
    out = library(rows, estimator=estimator, k=0.0, zeta=0.0, k_future=k_future)
    for members in by_key(rows, batch_of).values():
        mean_a = math.fsum(out[i]["adv_base"] for i in members) / len(members)
        for i in members:
            assert out[i]["empg_g"] == pytest.approx(1.0, abs=1e-15)
            assert out[i]["adv_empg"] == pytest.approx(out[i]["adv_base"] - mean_a, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(rows=rollouts(), data=st.data(), estimator=st.sampled_from(ESTIMATORS[:4]),
       empg_norm=st.sampled_from(["mean", "meanstd"]), reward_agg=st.sampled_from(["equal", "sum"]))
def test_results_do_not_depend_on_row_order(rows, data, estimator, empg_norm, reward_agg) -> None:
    order = data.draw(st.permutations(range(len(rows))))
    cfg = {"estimator": estimator, "empg_norm": empg_norm, "reward_agg": reward_agg, **NON_DEFAULT}
    before = library(rows, **cfg)
    after = library([rows[i] for i in order], **cfg)
    for new_pos, old_pos in enumerate(order):
        for c in ADVANTAGE_COLUMNS:
            assert after[new_pos][c] == pytest.approx(before[old_pos][c], abs=1e-12, rel=1e-12), c


@settings(max_examples=50, deadline=None)
@given(rows=rollouts(), estimator=st.sampled_from(ESTIMATORS[:4]), reward_agg=st.sampled_from(["equal", "sum"]),
       empg_norm=st.sampled_from(["mean", "meanstd"]))
def test_hypothesis_data_matches_reference(rows, estimator, reward_agg, empg_norm) -> None:
    """Everything but the future bonus, on hypothesis-shrinkable data (f_next has its own tests)."""
    assert_matches_reference(rows, BASE_AND_AEM_COLUMNS + ["empg_h_norm", "empg_g", "adv_empg"],
                             estimator=estimator, reward_agg=reward_agg, empg_norm=empg_norm, zeta=0.0)


@settings(max_examples=50, deadline=None)
@given(rows=rollouts(max_batches=1))
def test_f_next_properties(rows) -> None:
    """f_next = exp(-k' H_norm(t+1)) in (0, 1] before a trajectory's last step, exactly 0 at it."""
    out = library(rows)
    length = defaultdict(int)
    for r in rows:
        length[(group_of(r), r["traj_id"])] += 1
    for r, o in zip(rows, out):
        if r["step"] == length[(group_of(r), r["traj_id"])] - 1:
            assert o["empg_f_next"] == 0.0
        else:
            assert math.exp(-1.0) - 1e-12 <= o["empg_f_next"] <= 1.0


# --- degenerate cases ----------------------------------------------------------------------------

def one_trajectory_group(reward: float, entropies: list[float], *, last_only: bool = False) -> list[dict]:
    n = len(entropies)
    return [{"run": "r", "iteration": 0, "group_id": "g", "traj_id": "only", "step": s,
             "reward": None if last_only and s < n - 1 else reward, "step_entropy": h, "advantage": -0.25,
             "shard": "a"} for s, h in enumerate(entropies)]


@pytest.mark.parametrize("last_only", [False, True])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_group_of_one(estimator: str, last_only: bool) -> None:
    """docs/method.md: grpo uses m = 0, s = 1; drgrpo and rloo give R_i; reinforce R_i; column the column."""
    rows = one_trajectory_group(0.75, [0.3, 1.1, 0.6], last_only=last_only)
    want = {"grpo": 0.75 / (1.0 + EPS_STD), "drgrpo": 0.75, "rloo": 0.75, "reinforce": 0.75, "column": -0.25}[estimator]
    out = library(rows, estimator=estimator)
    for r in out:
        assert r["traj_reward"] == 0.75
        assert r["adv_base"] == pytest.approx(want, abs=1e-15)
        assert math.isfinite(r["adv_empg"]) and math.isfinite(r["adv_aem"])
    assert_matches_reference(rows, BASE_AND_AEM_COLUMNS + ["empg_h_norm", "empg_g"], estimator=estimator)


def test_group_of_one_inside_bigger_groups() -> None:
    """A lone trajectory's group-of-one rule applies to it only; its neighbours' groups are normal."""
    rows = one_trajectory_group(2.0, [0.5])
    for t, reward in (("x", 1.0), ("y", 0.0), ("z", 0.0)):
        rows.append({"run": "r", "iteration": 0, "group_id": "other", "traj_id": t, "step": 0, "reward": reward,
                     "step_entropy": 1.0, "advantage": 0.0, "shard": "a"})
    out = library(rows, estimator="rloo")
    assert out[0]["adv_base"] == 2.0
    assert [r["adv_base"] for r in out[1:]] == pytest.approx([1.5 * (1 - 1 / 3), 1.5 * (-1 / 3), 1.5 * (-1 / 3)])


@pytest.mark.parametrize("empg_norm", ["mean", "meanstd"])
def test_single_step_trajectories(empg_norm: str) -> None:
    """Every trajectory has one step: f_next = 0 everywhere, so A_mod = A_i g."""
    rows = [{"run": "r", "iteration": 0, "group_id": f"g{t // 2}", "traj_id": f"t{t}", "step": 0,
             "reward": float(t % 3), "step_entropy": 0.4 * t, "advantage": 0.0, "shard": "a"} for t in range(6)]
    out = library(rows, empg_norm=empg_norm, zeta=0.9)
    assert [r["empg_f_next"] for r in out] == [0.0] * 6
    assert_matches_reference(rows, ADVANTAGE_COLUMNS, empg_norm=empg_norm, zeta=0.9)


def test_one_step_batch_with_meanstd_is_zero() -> None:
    """A batch of one step: A_mod - mean = 0 and its std is taken as 0, so A_empg = 0 (not NaN)."""
    out = library(one_trajectory_group(1.0, [0.8]), empg_norm="meanstd")
    assert out[0]["adv_empg"] == 0.0
    assert out[0]["empg_f_next"] == 0.0 and out[0]["empg_g"] == 1.0


def test_equal_rewards_give_zero_grpo_advantage() -> None:
    rows = [{"run": "r", "iteration": 0, "group_id": "g", "traj_id": f"t{t}", "step": 0, "reward": 1.0,
             "step_entropy": 0.1 * t, "advantage": 0.0, "shard": "a"} for t in range(4)]
    for estimator in ("grpo", "drgrpo", "rloo"):
        out = library(rows, estimator=estimator)
        assert all(abs(r["adv_base"]) < 1e-12 and abs(r["adv_aem"]) < 1e-12 for r in out)


def test_sum_reward_agg_sums_step_rewards() -> None:
    rows = [{"run": "r", "iteration": 0, "group_id": "g", "traj_id": "a", "step": s, "reward": rew,
             "step_entropy": 1.0, "advantage": 0.0, "shard": "a"} for s, rew in enumerate([0.5, None, 0.25, 1.0])]
    out = library(rows, reward_agg="sum", estimator="reinforce")
    assert [r["traj_reward"] for r in out] == [1.75] * 4


def test_hyperparameters_change_the_result() -> None:
    """No accepted hyperparameter is ignored: moving each one moves some output column."""
    rows = random_rollouts(5)
    base = library(rows)
    for name, value in (("k", 2.0), ("k_future", 3.0), ("zeta", 0.5), ("aem_tau", 0.2), ("empg_norm", "meanstd"),
                        ("estimator", "rloo"), ("reward_agg", "sum"), ("aem_min_range", 1.0)):
        moved = library(rows, **{name: value})
        assert any(abs(a[c] - b[c]) > 1e-9 for a, b in zip(base, moved) for c in ADVANTAGE_COLUMNS), name


def test_keys_too_wide_for_one_integer_sort_give_the_same_result(monkeypatch) -> None:
    """Keys with more combined values than one integer sort takes (lowered here) use lexsort: it must agree."""
    import numpy as np

    import empg_cli.advantages as advantages
    rows = random_rollouts(5, n_batches=4)
    wide = [dict(r, iteration=r["iteration"] * 2 ** 60) for r in rows]
    narrow_out = library(rows)
    calls = []
    lexsort = np.lexsort
    monkeypatch.setattr(np, "lexsort", lambda keys: calls.append(1) or lexsort(keys))
    monkeypatch.setattr(advantages, "MIXED_RADIX_LIMIT", 2)
    wide_out = library(wide)
    assert calls, "the fallback sort did not run"
    for a, b in zip(narrow_out, wide_out):
        for name in ADVANTAGE_COLUMNS:
            assert a[name] == pytest.approx(b[name], abs=1e-12), name


@pytest.mark.parametrize("delta, spread, flat", [(0.1, 0.0999, True), (0.1, 0.1, False), (0.5, 0.3, True),
                                                 (0.0, 0.0, True), (0.0, 5e-9, True), (0.0, 1e-6, False)])
def test_aem_flat_group_threshold(delta: float, spread: float, flat: bool) -> None:
    """A group whose entropies span less than delta keeps w = 1; at delta = 0 only a spread within 1e-8 does."""
    rows = [{"run": "r", "iteration": 0, "group_id": "g", "traj_id": t, "step": 0, "reward": float(t == "a"),
             "step_entropy": 1.0 + h, "advantage": 0.0, "shard": "a"} for t, h in (("a", 0.0), ("b", spread))]
    w = [r["aem_w"] for r in library(rows, aem_min_range=delta)]
    if flat:
        assert w == [1.0, 1.0]
    else:  # u_norm = 0 and 1: w = exp(-u) / mean(1, e^-1)
        mean_scale = (1.0 + math.exp(-1.0)) / 2.0
        assert w == pytest.approx([1.0 / mean_scale, math.exp(-1.0) / mean_scale], abs=1e-12)


# --- trajectory structure ------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.sampled_from(["a", "b", "", "é", "a "]), min_size=1, max_size=40),
       blocks=st.booleans())
def test_text_codes_are_equal_exactly_for_equal_text(values, blocks) -> None:
    """Both ways of coding ids (runs of a blocked column, categories of a mixed one): dense codes 0..k-1 in order
    of first appearance, equal codes for equal text and only for it."""
    from empg_cli.advantages import _text_codes
    if blocks:
        values = sorted(values)
    codes = _text_codes(pl.Series(values, dtype=pl.String)).to_list()
    first_seen = list(dict.fromkeys(values))
    assert codes == [first_seen.index(v) for v in values]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), layout=st.sampled_from(LAYOUTS), wide=st.booleans())
def test_trajectory_structure_equals_a_dictionary_walk(data, layout, wide) -> None:
    """Equal trajectory (group, batch) ids exactly for equal keys, increasing along key order; key order holds each
    trajectory in one block, steps ascending; each step's successor row. Keys repeat across groups and batches; `wide`
    iterations are too far apart for value - min."""
    from empg_cli.advantages import BATCH, GROUP, KEY_ORDER, NEXT, TRAJ, trajectory_structure
    iterations = [-2 ** 63, 0, 2 ** 62] if wide else [0, 1, 7]
    rows = []
    for run, iteration in data.draw(st.lists(st.tuples(st.sampled_from("xy"), st.sampled_from(iterations)),
                                             min_size=1, max_size=3, unique=True)):
        for g in range(data.draw(st.integers(1, 3))):
            for t in range(data.draw(st.integers(1, 3))):
                rows += [{"run": run, "iteration": iteration, "group_id": f"g{g}", "traj_id": f"t{t}", "step": s}
                         for s in range(data.draw(st.integers(1, 4)))]
    rows = arrange(rows, layout, lambda n: data.draw(st.permutations(range(n))))
    out = trajectory_structure(pl.DataFrame(rows), ["run", "iteration"])
    traj_of = lambda r: (*group_of(r), r["traj_id"])  # noqa: E731
    order = out[KEY_ORDER].to_list()
    assert sorted(order) == list(range(len(rows)))
    along = [rows[i] for i in order]
    blocks = [traj_of(r) for k, r in enumerate(along) if k == 0 or traj_of(r) != traj_of(along[k - 1])]
    assert len(blocks) == len(set(blocks))
    assert all(b["step"] == a["step"] + 1 for a, b in zip(along, along[1:]) if traj_of(a) == traj_of(b))
    for name, key in ((TRAJ, traj_of), (GROUP, group_of), (BATCH, batch_of)):
        ids = out[name].to_list()
        assert len(set(ids)) == len({key(r) for r in rows}), name
        assert all((ids[i] == ids[j]) == (key(rows[i]) == key(rows[j])) for i in range(len(rows))
                   for j in range(len(rows))), name
        assert [ids[i] for i in order] == sorted(ids), name
    where = {(*traj_of(r), r["step"]): i for i, r in enumerate(rows)}
    assert out[NEXT].to_list() == [where.get((*traj_of(r), r["step"] + 1), -1) for r in rows]
