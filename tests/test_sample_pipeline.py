"""The sample workload (docs/sample_data.md): the shrunk regeneration end to end, and the shipped sample_data/ itself.

The tiny run exercises every stage of examples/make_sample.py (demonstrations, tokenizer, behaviour
cloning, RL iterations that call `empg score`), then scores the result with no model flag, as
`make demo` does with the real sample.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
EMPG = Path(sys.executable).with_name("empg")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TOLERANCE_NATS = 1e-3


def regenerate(*outs: Path) -> None:
    """`make_sample.py --tiny` with one seed into each folder, side by side."""
    runs = [subprocess.Popen([sys.executable, str(ROOT / "examples" / "make_sample.py"), "--tiny", "--seed", "7",
                              "--out", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for out in outs]
    for run in runs:
        output, _ = run.communicate()
        assert run.returncode == 0, output


def test_tiny_regeneration_end_to_end(tmp_path: Path) -> None:
    """One test, so that pytest-xdist never runs the (slow) regeneration twice for one module."""
    tiny, again = tmp_path / "tiny", tmp_path / "again"
    regenerate(tiny, again)
    subprocess.run([str(EMPG), "score", str(tiny / "rollouts.parquet"), "--device", "cpu"], check=True, env=ENV,
                   capture_output=True)  # float32, like the sampler: the logged entropies are checked to 1e-3
    check_metadata_names_the_checkpoint_of_every_iteration(tiny)
    check_tiny_sample_has_the_shape_of_the_real_one(tiny)
    check_steps_form_a_token_exact_prefix_chain_that_the_chat_template_renders(tiny)
    check_logged_and_rescored_entropies_agree(tiny)
    check_regeneration_is_deterministic(tiny, again)


def trajectories(frame: pl.DataFrame) -> list[pl.DataFrame]:
    return [t.sort("step") for t in frame.partition_by("iteration", "group_id", "traj_id", maintain_order=True)]


def check_metadata_names_the_checkpoint_of_every_iteration(tiny: Path) -> None:
    table = pq.read_table(tiny / "rollouts.parquet")
    assert json.loads(table.schema.metadata[b"empg"]) == {"model": {"ref": "checkpoints/iter_{iteration}"},
                                                          "temperature": 1.0}
    for iteration in set(table.column("iteration").to_pylist()):
        checkpoint = tiny / "checkpoints" / f"iter_{iteration}"
        names = {p.name for p in checkpoint.iterdir()}
        assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= names
        assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)


def check_tiny_sample_has_the_shape_of_the_real_one(tiny: Path) -> None:
    frame = pl.read_parquet(tiny / "rollouts.parquet")
    assert frame["iteration"].unique().sort().to_list() == [0, 1]
    per_iteration = frame.group_by("iteration").agg(pl.col("group_id").n_unique().alias("groups"),
                                                    pl.col("traj_id").n_unique().alias("trajs"))
    assert per_iteration["groups"].to_list() == [2, 2] and per_iteration["trajs"].to_list() == [4, 4]
    for traj in trajectories(frame):
        assert traj["step"].to_list() == list(range(traj.height))
        assert traj["reward"].n_unique() == 1 and traj["reward"][0] in (0.0, 1.0)
        assert traj["reward"][0] == float(traj["success"][0])
    assert frame["step"].max() >= 4  # trajectories of 5 steps and more
    assert (frame["response_ids"].list.len() == frame["token_entropy"].list.len()).all()
    assert (frame["response_ids"].list.len() > 0).all()


def check_steps_form_a_token_exact_prefix_chain_that_the_chat_template_renders(tiny: Path) -> None:
    """Sampled response ids need not be the canonical tokenisation of their text, but everything the
    environment adds is: the checkpoint's tokenizer, loaded as empg loads it, reproduces those ids."""
    from transformers import AutoTokenizer

    frame = pl.read_parquet(tiny / "rollouts.parquet")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "checkpoints" / "iter_0")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for traj in trajectories(frame):
        rows = traj.to_dicts()
        assert encode(rows[0]["prompt"]) == rows[0]["prompt_ids"]
        for row, following in zip(rows, rows[1:]):
            chain = row["prompt_ids"] + row["response_ids"]
            assert following["prompt_ids"][:len(chain)] == chain
            turn = following["prompt_ids"][len(chain):]
            assert encode(tokenizer.decode(turn)) == turn
        for row in rows:
            assert tokenizer.decode(row["prompt_ids"]) == row["prompt"]
            assert tokenizer.decode(row["response_ids"]) == row["response"]
            assert tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True,
                                                 tokenize=False) == row["prompt"]


def check_logged_and_rescored_entropies_agree(tiny: Path) -> None:
    scored = pl.read_parquet(tiny / "rollouts.scored.parquet")
    gap = (scored["step_entropy"] - scored["token_entropy"].list.mean()).abs().max()
    assert gap < TOLERANCE_NATS


def check_regeneration_is_deterministic(tiny: Path, again: Path) -> None:
    assert (again / "rollouts.parquet").read_bytes() == (tiny / "rollouts.parquet").read_bytes()
    for weights in (tiny / "checkpoints").glob("iter_*/model.safetensors"):
        assert (again / weights.relative_to(tiny)).read_bytes() == weights.read_bytes()


@pytest.mark.skipif(not (SAMPLE / "rollouts.parquet").exists(), reason="sample_data/ not generated")
def test_shipped_sample_meets_its_targets() -> None:
    table = pq.read_table(SAMPLE / "rollouts.parquet")
    frame = pl.from_arrow(table).with_columns(step_entropy=pl.col("token_entropy").list.mean())
    per_iteration = frame.group_by("iteration").agg(pl.col("group_id").n_unique().alias("groups"),
                                                    pl.col("traj_id").n_unique().alias("trajs"))
    assert per_iteration.height >= 3 and per_iteration["groups"].min() >= 8
    assert (frame.group_by("iteration", "group_id").agg(pl.col("traj_id").n_unique())["traj_id"] >= 4).all()
    assert frame["step"].max() >= 4
    success = frame.group_by("iteration", "traj_id").agg(pl.col("success").first())["success"].mean()
    assert 0.1 <= success <= 0.9
    assert frame["step_entropy"].std() >= 0.1
    summaries = json.loads(table.schema.metadata[b"empg_sample"])["iterations"]
    assert max(s["max_entropy_gap"] for s in summaries) < TOLERANCE_NATS
    for iteration in frame["iteration"].unique():
        assert (SAMPLE / "checkpoints" / f"iter_{iteration}" / "model.safetensors").exists()
    size = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file() and ".scored." not in p.name)
    assert size <= 15 * 2**20
    assert np.isfinite(frame["reward"].to_numpy()).all()
