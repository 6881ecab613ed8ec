"""The scored file: rows and input columns untouched, the new columns of `empg schema scored`, provenance metadata,
options."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import build_model, random_rollouts, write_rollouts
from empg_cli.cli import main
from empg_cli.config import AdvantageConfig, ScoreConfig
from empg_cli.pipeline import score_file
from empg_cli.schema import load_schema

NEW_COLUMNS = [c["name"] for c in load_schema("scored")["columns"]]


def _metadata(path) -> dict:
    return json.loads(pq.read_schema(path).metadata[b"empg"])


def test_scored_table_keeps_input_rows_and_columns_and_appends_spec_columns(tmp_path, tiny_model_dir):
    rows = random_rollouts(np.random.default_rng(0))
    rows["note"] = [f"n{i}" for i in range(len(rows["run"]))]  # an extra column is carried through
    src = write_rollouts(tmp_path / "in.parquet", rows)
    original = pq.read_table(src)
    out = tmp_path / "out.parquet"
    score_file(src, out, ScoreConfig(model=str(tiny_model_dir)), AdvantageConfig())
    scored = pq.read_table(out)
    assert scored.column_names == original.column_names + NEW_COLUMNS
    for name in original.column_names:
        assert scored.column(name).equals(original.column(name)), name
    types = {c["name"]: c["type"] for c in load_schema("scored")["columns"]}
    for name in NEW_COLUMNS:
        assert str(scored.schema.field(name).type) == {"float64": "double", "int32": "int32"}[types[name]]
    frame = pl.from_arrow(scored)
    assert frame["n_response_tokens"].to_list() == [len(r) for r in rows["response_ids"]]
    for name in NEW_COLUMNS:
        assert frame[name].null_count() == 0, name


def test_metadata_records_provenance_and_every_hyperparameter(tmp_path, tiny_model_dir):
    src = write_rollouts(tmp_path / "in.parquet", random_rollouts(np.random.default_rng(1)))
    out = tmp_path / "out.parquet"
    score_file(src, out, ScoreConfig(model=str(tiny_model_dir), temperature=0.8),
               AdvantageConfig(k=2.0, zeta=0.3, aem_tau=0.5, aem_min_range=0.25, estimator="rloo"))
    meta = _metadata(out)
    import hashlib
    assert meta["input_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["schema_version"] == 1 and meta["tool"] == "empg" and meta["tool_version"]
    assert meta["temperature"] == 0.8 and meta["entropy_source"] == "model" and meta["estimator"] == "rloo"
    assert meta["advantages"] == {"estimator": "rloo", "reward_agg": "equal", "k": 2.0, "k_future": 1.0, "zeta": 0.3,
                                  "empg_norm": "mean", "aem_tau": 0.5, "aem_min_range": 0.25,
                                  "batch_key": ["run", "iteration"]}
    assert meta["score"]["batch_tokens"] == 8192 and meta["score"]["dtype"] == "auto"
    assert meta["device"] == meta["model"]["device"] == "cpu" and meta["dtype"] == meta["model"]["dtype"] == "float32"
    checkpoint = meta["model"]["checkpoints"][str(tiny_model_dir)]
    weights = hashlib.sha256(b"model.safetensors\0" + hashlib.sha256(
        (tiny_model_dir / "model.safetensors").read_bytes()).digest()).hexdigest()
    assert checkpoint["weights_sha256"] == weights and checkpoint["iterations"] == [0, 1]
    assert meta["created_utc"].endswith("+00:00")


def test_token_level_lists_align_with_response_ids(tmp_path, tiny_model_dir):
    rows = random_rollouts(np.random.default_rng(2))
    src = write_rollouts(tmp_path / "in.parquet", rows)
    out = tmp_path / "out.parquet"
    score_file(src, out, ScoreConfig(model=str(tiny_model_dir), token_level=True), AdvantageConfig())
    frame = pl.read_parquet(out)
    for name in ("token_entropy", "token_logprob", "token_adv_empg", "token_adv_aem"):
        assert frame[name].dtype == pl.List(pl.Float32), name
        assert frame[name].list.len().to_list() == [len(r) for r in rows["response_ids"]], name
    np.testing.assert_allclose(frame["token_entropy"].list.mean().to_numpy(), frame["step_entropy"].to_numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(frame["token_logprob"].list.sum().to_numpy(), frame["step_logprob"].to_numpy(),
                               atol=1e-4)
    for name in ("empg", "aem"):
        assert (frame[f"token_adv_{name}"].list.min() == frame[f"token_adv_{name}"].list.max()).all()
        np.testing.assert_allclose(frame[f"token_adv_{name}"].list.first().to_numpy(),
                                   frame[f"adv_{name}"].to_numpy(), rtol=1e-6)


def test_logged_entropies_need_no_model_and_leave_model_columns_null(tmp_path):
    rng = np.random.default_rng(3)
    rows = random_rollouts(rng)
    rows["token_entropy"] = [list(rng.uniform(0, 3, size=len(r))) for r in rows["response_ids"]]
    src = write_rollouts(tmp_path / "in.parquet", rows)
    out = tmp_path / "out.parquet"
    score_file(src, out, ScoreConfig(entropy_source="logged", token_level=True), AdvantageConfig())
    frame = pl.read_parquet(out)
    expected = [sum(np.float32(v) for v in e) / len(e) for e in rows["token_entropy"]]
    np.testing.assert_allclose(frame["step_entropy"].to_numpy(), expected, rtol=1e-6)
    for name in ("step_renyi2", "step_logprob", "step_grad_norm_sq", "step_grad_norm_sq_expected", "token_logprob"):
        assert frame[name].null_count() == frame.height, name
    assert _metadata(out)["model"] is None and _metadata(out)["entropy_source"] == "logged"


def test_iteration_template_scores_each_iteration_with_its_checkpoint(tmp_path):
    for it, seed in ((0, 10), (1, 11)):
        build_model(tmp_path / f"ckpt/step_{it}", seed=seed)
    rows = random_rollouts(np.random.default_rng(4), iterations=2)
    src = write_rollouts(tmp_path / "in.parquet", rows)
    both = tmp_path / "both.parquet"
    score_file(src, both, ScoreConfig(model=str(tmp_path / "ckpt/step_{iteration}")), AdvantageConfig())
    frame = pl.read_parquet(both)
    for it in (0, 1):
        alone = tmp_path / f"alone{it}.parquet"
        score_file(src, alone, ScoreConfig(model=str(tmp_path / f"ckpt/step_{it}")), AdvantageConfig())
        mask = (frame["iteration"] == it).to_numpy()
        np.testing.assert_allclose(frame["step_entropy"].to_numpy()[mask],
                                   pl.read_parquet(alone)["step_entropy"].to_numpy()[mask], atol=1e-7)
    assert set(_metadata(both)["model"]["checkpoints"]) == {str(tmp_path / f"ckpt/step_{i}") for i in (0, 1)}


def test_model_and_temperature_from_the_inputs_metadata_relative_to_its_folder(tmp_path, tiny_model_dir, capsys):
    shutil.copytree(tiny_model_dir, tmp_path / "data/checkpoints/iter_0")
    shutil.copytree(tiny_model_dir, tmp_path / "data/checkpoints/iter_1")
    rows = random_rollouts(np.random.default_rng(5))
    src = write_rollouts(tmp_path / "data/runs.parquet", rows,
                         metadata={"model": {"ref": "checkpoints/iter_{iteration}"}, "temperature": 0.9})
    explicit = tmp_path / "explicit.parquet"
    score_file(src, explicit, ScoreConfig(model=str(tiny_model_dir), temperature=0.9), AdvantageConfig())
    assert main(["score", str(src)]) == 0, capsys.readouterr().err
    implicit = tmp_path / "data/runs.scored.parquet"
    np.testing.assert_allclose(pl.read_parquet(implicit)["step_entropy"].to_numpy(),
                               pl.read_parquet(explicit)["step_entropy"].to_numpy(), atol=1e-7)
    assert _metadata(implicit)["temperature"] == 0.9


def test_rows_in_any_order_get_the_same_results(tmp_path, tiny_model_dir):
    rows = random_rollouts(np.random.default_rng(6), shuffle=False)
    order = np.random.default_rng(7).permutation(len(rows["run"]))
    shuffled = {k: [v[i] for i in order] for k, v in rows.items()}
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    score_file(write_rollouts(tmp_path / "x.parquet", rows), a, ScoreConfig(model=str(tiny_model_dir)), AdvantageConfig())
    score_file(write_rollouts(tmp_path / "y.parquet", shuffled), b, ScoreConfig(model=str(tiny_model_dir)),
               AdvantageConfig())
    fa, fb = pl.read_parquet(a), pl.read_parquet(b)
    for name in NEW_COLUMNS:
        np.testing.assert_allclose(fb[name].to_numpy(), fa[name].to_numpy()[order], atol=1e-9, err_msg=name)


def test_advantages_recompute_keeps_stored_flags_and_statistics(tmp_path, tiny_model_dir, capsys):
    src = write_rollouts(tmp_path / "in.parquet", random_rollouts(np.random.default_rng(8)))
    scored = tmp_path / "in.scored.parquet"
    stored = dict(zeta=0.3, estimator="reinforce", aem_min_range=0.0)  # A_i = R_i != 0, so k matters
    score_file(src, scored, ScoreConfig(model=str(tiny_model_dir), token_level=True), AdvantageConfig(**stored))
    assert main(["advantages", str(scored), "--k", "2"]) == 0, capsys.readouterr().err
    redone = tmp_path / "in.scored.adv.parquet"
    meta = _metadata(redone)
    assert meta["advantages"]["k"] == 2.0 and meta["advantages"]["zeta"] == 0.3
    assert meta["advantages"]["estimator"] == "reinforce" and meta["advantages"]["aem_min_range"] == 0.0
    assert meta["model"] == _metadata(scored)["model"]  # provenance of the statistics is kept
    direct = tmp_path / "direct.parquet"
    score_file(src, direct, ScoreConfig(model=str(tiny_model_dir), token_level=True), AdvantageConfig(k=2.0, **stored))
    a, b, s = pl.read_parquet(redone), pl.read_parquet(direct), pl.read_parquet(scored)
    assert a.columns == s.columns
    for name in NEW_COLUMNS + ["token_adv_empg", "token_adv_aem"]:
        assert a[name].equals(b[name]), name
    assert not np.allclose(a["adv_empg"].to_numpy(), s["adv_empg"].to_numpy())
    assert (s["aem_w"] != 1.0).any()
    flat = tmp_path / "flat.parquet"  # no group of this model's entropies spans 10 nats: every w = 1
    assert main(["advantages", str(scored), "--aem-min-range", "10", "-o", str(flat)]) == 0
    assert (pl.read_parquet(flat)["aem_w"] == 1.0).all() and _metadata(flat)["advantages"]["aem_min_range"] == 10.0
    assert main(["advantages", str(src)]) == 2
    assert "is not a scored file" in capsys.readouterr().err


def test_streaming_in_small_chunks_equals_one_chunk(tmp_path):
    """Chunks split trajectories and alternate checkpoints; every result equals the whole-file run."""
    for it, seed in ((0, 20), (1, 21)):
        build_model(tmp_path / f"ckpt/{it}", seed=seed)
    rows = random_rollouts(np.random.default_rng(12), iterations=2, groups=4)
    src = tmp_path / "in.parquet"
    write_rollouts(src, rows)
    pq.write_table(pq.read_table(src), src, row_group_size=7)
    cfg = ScoreConfig(model=str(tmp_path / "ckpt/{iteration}"), token_level=True)
    whole, chunked = tmp_path / "whole.parquet", tmp_path / "chunked.parquet"
    score_file(src, whole, cfg, AdvantageConfig())
    score_file(src, chunked, cfg, AdvantageConfig(), rows_per_chunk=5)
    a, b = pq.read_table(whole), pq.read_table(chunked)
    assert a.num_rows == b.num_rows == len(rows["run"]) and a.column_names == b.column_names
    for name in a.column_names:
        if a.schema.field(name).type in (pa.float64(), pa.list_(pa.float32())):
            left, right = pl.from_arrow(a.column(name)), pl.from_arrow(b.column(name))
            if left.dtype == pl.List(pl.Float32):
                left, right = left.explode(), right.explode()
            np.testing.assert_allclose(right.to_numpy(), left.to_numpy(), atol=1e-5, err_msg=name)
        else:
            assert a.column(name).equals(b.column(name)), name
    assert pq.ParquetFile(chunked).metadata.num_row_groups > 1
    # rows are shuffled, so trajectories straddle chunks: each still waits and is scored whole, as one chain
    shared = [_metadata(p)["model"]["prefix_shared_trajectories"] for p in (whole, chunked)]
    assert shared[0] == shared[1] > 0


def test_new_columns_have_the_schema_types(tmp_path, tiny_model_dir):
    src = write_rollouts(tmp_path / "in.parquet", random_rollouts(np.random.default_rng(13)))
    out = tmp_path / "out.parquet"
    score_file(src, out, ScoreConfig(model=str(tiny_model_dir), token_level=True), AdvantageConfig())
    schema = pq.read_schema(out)
    arrow = {"float64": pa.float64(), "int32": pa.int32(), "list<float32>": pa.list_(pa.float32())}
    scored = load_schema("scored")
    for col in scored["columns"] + scored["token_level_columns"]:
        assert schema.field(col["name"]).type.equals(arrow[col["type"]]), col["name"]


def test_cli_scores_on_the_requested_device_with_its_default_dtype(tmp_path, tiny_model_dir, device, capsys):
    """`--dtype auto` is bfloat16 on cuda and float32 on the CPU; the metadata says which ran, and the
    statistics stay within bfloat16's reach of a float32 CPU run."""
    src = write_rollouts(tmp_path / "in.parquet", random_rollouts(np.random.default_rng(8)))
    out = tmp_path / "out.parquet"
    assert main(["score", str(src), "--model", str(tiny_model_dir), "--device", device, "-o", str(out)]) == 0, \
        capsys.readouterr().err
    meta = _metadata(out)
    assert meta["device"].split(":")[0] == device
    assert meta["dtype"] == {"cpu": "float32", "cuda": "bfloat16"}[device]
    reference = tmp_path / "cpu.parquet"
    score_file(src, reference, ScoreConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"), AdvantageConfig())
    got, want = pl.read_parquet(out), pl.read_parquet(reference)
    np.testing.assert_allclose(got["step_entropy"].to_numpy(), want["step_entropy"].to_numpy(),
                               atol=1e-5 if device == "cpu" else 0.1)
    assert got["step_entropy"].dtype == pl.Float64


def test_commands_without_a_model_never_import_torch(tmp_path):
    """Logged-entropy `score`, `advantages`, `audit`, `validate` and `plot` need no model: importing torch would
    cost a sweep over many `empg advantages` calls more than the advantages themselves."""
    import subprocess
    import sys
    rows = random_rollouts(np.random.default_rng(9))
    rows["token_entropy"] = [[0.5] * len(r) for r in rows["response_ids"]]
    src = write_rollouts(tmp_path / "in.parquet", rows)
    scored, redone = tmp_path / "in.scored.parquet", tmp_path / "redone.parquet"
    commands = [["score", str(src), "--entropy-source", "logged"], ["advantages", str(scored), "-o", str(redone)],
                ["audit", str(scored), "--format", "json"], ["validate", str(scored)],
                ["plot", "dynamics", str(scored), "--out-dir", str(tmp_path / "plots")]]
    script = ("import sys\nfrom empg_cli.cli import main\n"
              f"for argv in {commands!r}:\n"
              "    assert main(argv) == 0, argv\n"
              "    assert 'torch' not in sys.modules, argv\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
