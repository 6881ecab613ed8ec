"""The Ray engine on a local two-CPU cluster gives the local engine's table; a worker's error is one error line."""

from __future__ import annotations

import re
import socket
import sys

import numpy as np
import polars as pl
import pytest

from conftest import build_model, random_rollouts, write_rollouts
from empg_cli.advantages import ADVANTAGE_COLUMNS
from empg_cli.chunk import STEP_COLUMNS
from empg_cli.cli import main
from empg_cli.config import AdvantageConfig, ScoreConfig
from empg_cli.pipeline import score_file
from empg_cli.progress import Progress


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module: the engine uses a Ray already initialised in the process."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_without_ray_the_ray_engine_is_one_error_saying_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    src = write_rollouts(tmp_path / "in.parquet", random_rollouts(np.random.default_rng(42), groups=1))
    code = main(["score", str(src), "--model", str(tmp_path / "m"), "--engine", "ray"])
    assert code == 2
    assert capsys.readouterr().err == "error: --engine ray needs Ray: pip install 'empg[ray]'\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


def test_ray_engine_gives_the_local_engines_table(tmp_path, cluster):
    """Two workers, small chunks finishing in any order, one checkpoint per iteration, token-level lists."""
    for it, seed in ((0, 30), (1, 31)):
        build_model(tmp_path / f"ckpt/step_{it}", seed=seed)
    src = write_rollouts(tmp_path / "in.parquet", random_rollouts(np.random.default_rng(40), groups=4))
    cfg = ScoreConfig(model=str(tmp_path / "ckpt/step_{iteration}"), token_level=True)
    local, distributed = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    score_file(src, local, cfg, AdvantageConfig(), chunk_tokens=60)
    notes: list[str] = []
    summary = score_file(src, distributed, cfg, AdvantageConfig(), engine="ray", workers=2, chunk_tokens=60,
                         progress=Progress(note=notes.append))
    a, b = pl.read_parquet(local), pl.read_parquet(distributed)
    assert a.columns == b.columns and summary.tokens_scored == a["n_response_tokens"].sum()
    assert a.select("group_id", "traj_id", "step", "iteration", "response_ids").equals(
        b.select("group_id", "traj_id", "step", "iteration", "response_ids"))  # same rows in the same order
    assert a["n_response_tokens"].equals(b["n_response_tokens"])
    for name in STEP_COLUMNS[1:]:
        np.testing.assert_allclose(b[name].to_numpy(), a[name].to_numpy(), atol=1e-5, rtol=0, err_msg=name)
    for name in ADVANTAGE_COLUMNS:
        np.testing.assert_allclose(b[name].to_numpy(), a[name].to_numpy(), atol=1e-6, rtol=0, err_msg=name)
    for name in ("token_entropy", "token_logprob", "token_adv_empg"):
        assert a[name].list.len().equals(b[name].list.len()), name
        np.testing.assert_allclose(b[name].explode().to_numpy(), a[name].explode().to_numpy(), atol=1e-5,
                                   err_msg=name)
    assert not list(tmp_path.glob(".empg-*"))  # no work folder, lock or temp file left
    for it in (0, 1):  # each worker's checkpoint loads reach the driver's log, the worker named
        ref = str(tmp_path / f"ckpt/step_{it}")
        assert any(re.fullmatch(rf"worker \d+@\S+: loaded {re.escape(ref)} in \d+\.\d s", n) for n in notes), notes


def test_a_worker_that_raises_is_one_error_line(tmp_path, capsys, cluster):
    """A bad token id is found on a worker: the user sees the same one line as with the local engine."""
    build_model(tmp_path / "m")
    rows = random_rollouts(np.random.default_rng(41))
    rows["response_ids"][3] = [7, 100_000]
    src = write_rollouts(tmp_path / "in.parquet", rows)
    code = main(["score", str(src), "--model", str(tmp_path / "m"), "--engine", "ray", "--workers", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1] == (f"error: {src}: column 'response_ids', row 3: token id 100000 is outside "
                                            "the model's vocabulary (0..319)")
    assert "Traceback" not in err and not (tmp_path / "in.scored.parquet").exists()


def test_ray_flags_without_the_ray_engine_are_bad_usage(tmp_path, capsys):
    src = write_rollouts(tmp_path / "in.parquet", random_rollouts(np.random.default_rng(43), groups=1))
    for flags in (["--workers", "2"], ["--ray-address", "auto"]):
        assert main(["score", str(src), "--model", str(tmp_path / "m"), *flags]) == 2
        assert capsys.readouterr().err == "error: --workers and --ray-address need --engine ray\n"
    assert main(["score", str(src), "--model", str(tmp_path / "m"), "--engine", "ray", "--workers", "0"]) == 2
    assert capsys.readouterr().err == "error: --workers must be >= 1; got 0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]



def test_a_cluster_that_cannot_be_reached_is_one_error_line(tmp_path, capsys, monkeypatch):
    """ray.init's ConnectionError (a wrong --ray-address, a stopped cluster, a missing token) is bad usage naming the
    address, before any scoring: exit 2, one line, nothing written. (Ray itself takes minutes to give up on a
    closed port, so its error is raised here directly.)"""
    ray = pytest.importorskip("ray")

    def unreachable(address=None, **kwargs):
        raise ConnectionError(f"Failed to connect to Ray cluster at {address}")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", unreachable)
    build_model(tmp_path / "m")
    src = write_rollouts(tmp_path / "in.parquet", random_rollouts(np.random.default_rng(44), groups=1))
    capsys.readouterr()
    code = main(["score", str(src), "--model", str(tmp_path / "m"), "--engine", "ray", "--ray-address", "auto"])
    assert code == 2
    assert capsys.readouterr().err == (
        "error: cannot attach to the Ray cluster at auto (Failed to connect to Ray cluster at auto): check that it "
        "runs (`ray status` there) and, if it uses token authentication, that RAY_AUTH_MODE=token is set here\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "m"]


def test_an_address_where_nothing_listens_fails_at_once(tmp_path, capsys, monkeypatch):
    """A closed port is found before ray.init, which would retry it for minutes."""
    ray = pytest.importorskip("ray")

    def not_reached(**kwargs):
        raise AssertionError("ray.init was called")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", not_reached)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as s:  # a free port, closed again
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    build_model(tmp_path / "m")
    src = write_rollouts(tmp_path / "in.parquet", random_rollouts(np.random.default_rng(45), groups=1))
    capsys.readouterr()
    assert main(["score", str(src), "--model", str(tmp_path / "m"), "--engine", "ray", "--ray-address", address]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot attach to the Ray cluster at {address} (Connection refused): ")
    assert len(err.splitlines()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "m"]
