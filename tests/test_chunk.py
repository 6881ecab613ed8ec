"""Chunks: whole trajectories, each row once, within the token and step bounds; rows read back as they are."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings, strategies as st

from conftest import random_rollouts, write_rollouts
from empg_cli.chunk import plan_chunks, read_rows, stream_rows
from empg_cli.config import AdvantageConfig
from empg_cli.rollouts import open_rollouts


def _steps(n_trajs: list[int], rng: np.random.Generator) -> pl.DataFrame:
    """Key frame of trajectories with the given step counts, rows shuffled."""
    rows = [(f"t{t}", s) for t, n in enumerate(n_trajs) for s in range(n)]
    order = rng.permutation(len(rows))
    return pl.DataFrame({"_row": np.arange(len(rows)), "run": "r", "iteration": 0, "group_id": "g",
                         "traj_id": [rows[i][0] for i in order], "step": [rows[i][1] for i in order]})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=30), st.integers(1, 40), st.integers(0, 2 ** 32 - 1),
       st.floats(0, 1))
def test_chunks_hold_whole_trajectories_once_within_the_budget(n_trajs, budget, seed, done_share):
    rng = np.random.default_rng(seed)
    steps = _steps(n_trajs, rng)
    costs = rng.integers(1, 10, size=steps.height)
    done_trajs = {f"t{t}" for t in range(len(n_trajs)) if rng.random() < done_share}
    done = steps["traj_id"].is_in(list(done_trajs)).to_numpy()
    chunks = list(plan_chunks(steps, costs, done, lambda left: budget))
    rows = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    assert sorted(rows.tolist()) == np.flatnonzero(~done).tolist()  # every row not done, once
    owner = {}
    for i, chunk in enumerate(chunks):
        assert np.all(np.diff(chunk) > 0)
        trajs = steps[chunk]["traj_id"].unique().to_list()
        for t in trajs:
            assert owner.setdefault(t, i) == i  # a trajectory lies in one chunk
        assert len(trajs) == 1 or costs[chunk].sum() <= budget
    lasts = [steps[c].group_by("traj_id").agg(pl.col("_row").max())["_row"].max() for c in chunks]
    assert lasts == sorted(lasts)  # in the order their last rows are read


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=30), st.integers(0, 2 ** 32 - 1), st.integers(1, 4))
def test_the_budget_is_asked_with_the_tokens_not_yet_planned(n_trajs, seed, shares):
    """Guided chunk sizes (the Ray engine): each budget call gets the cost of the rows left after the chunks so far,
    so a budget of left / shares shrinks the chunks towards the end."""
    rng = np.random.default_rng(seed)
    steps = _steps(n_trajs, rng)
    costs = rng.integers(1, 10, size=steps.height)
    done = rng.random(steps.height) < 0.2
    done = steps.with_columns(done=pl.Series(done)).select(pl.col("done").any().over("traj_id"))["done"].to_numpy()
    asked = []
    chunks = list(plan_chunks(steps, costs, done, lambda left: asked.append(left) or max(1, left // shares)))
    planned = 0
    for left, chunk in zip(asked, chunks):
        assert left == int(costs[~done].sum()) - planned
        planned += int(costs[chunk].sum())
    assert len(asked) == len(chunks) and planned == int(costs[~done].sum())


def test_reading_rows_by_row_group_or_streaming_gives_the_files_rows(tmp_path):
    src = write_rollouts(tmp_path / "in.parquet", random_rollouts(np.random.default_rng(70), groups=4))
    pq.write_table(pq.read_table(src), src, row_group_size=7)
    table = pq.read_table(src, columns=["prompt_ids", "response_ids"])
    rollouts = open_rollouts(src, AdvantageConfig())
    done = np.zeros(table.num_rows, dtype=bool)
    done[rollouts.steps.filter(pl.col("traj_id") == "t0")["_row"].to_numpy()] = True
    chunks = list(plan_chunks(rollouts.steps, np.ones(table.num_rows, dtype=np.int64), done, lambda left: 9))
    streamed = list(stream_rows(rollouts, ["prompt_ids", "response_ids"], iter(chunks), done, rows_per_chunk=5))
    assert len(streamed) == len(chunks) > 3
    for rows, (got_rows, got) in zip(chunks, streamed):
        want = table.take(pa.array(rows))
        assert np.array_equal(got_rows, rows) and got.equals(want)
        assert read_rows(rollouts.source, ["prompt_ids", "response_ids"], rows).equals(want)
