"""Long scoring survives being killed: committed chunks are reused by the same command and by nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import random_rollouts, write_rollouts
from empg_cli.chunk import STEP_COLUMNS
from empg_cli.cli import main
from empg_cli.config import AdvantageConfig, ScoreConfig
from empg_cli.output import sidecar
from empg_cli.pipeline import score_file

CHUNK_TOKENS = 80  # a handful of trajectories per committed part


def _work(out: Path) -> Path:
    return sidecar(out, "work")


def _assert_same_table(got: Path, want: Path) -> None:
    """Equal up to float32 summation order: chunks batch the steps differently."""
    a, b = pl.read_parquet(got), pl.read_parquet(want)
    assert a.columns == b.columns and a["n_response_tokens"].equals(b["n_response_tokens"])
    for name, atol in [(name, 1e-5) for name in STEP_COLUMNS[1:]] + [("adv_empg", 1e-6), ("adv_aem", 1e-6)]:
        np.testing.assert_allclose(a[name].to_numpy(), b[name].to_numpy(), atol=atol, rtol=0, err_msg=name)


def _interrupted(src: Path, out: Path, cfg: ScoreConfig, monkeypatch, chunks: int = 2) -> None:
    """A run that fails after committing `chunks` parts (as a crash would), leaving its work folder."""
    import empg_cli.engines.local as local
    real, calls = local.score_chunk, []

    def failing(*args, **kwargs):
        if len(calls) == chunks:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(local, "score_chunk", failing)
        with pytest.raises(KeyboardInterrupt):
            score_file(src, out, cfg, AdvantageConfig(), overwrite=True, chunk_tokens=CHUNK_TOKENS)
    assert len(list(_work(out).glob("part-*.parquet"))) == chunks


@pytest.fixture
def case(tmp_path, tiny_model_dir):
    src = write_rollouts(tmp_path / "in.parquet", random_rollouts(np.random.default_rng(50), groups=4))
    fresh = tmp_path / "fresh.parquet"
    cfg = ScoreConfig(model=str(tiny_model_dir))
    score_file(src, fresh, cfg, AdvantageConfig())
    return src, cfg, fresh


def test_a_run_killed_with_sigkill_resumes_to_the_same_table(tmp_path, case, capsys):
    src, cfg, fresh = case
    out = tmp_path / "in.scored.parquet"
    child = ("import sys, time\n"
             "import empg_cli.work as work\n"
             "commit = work.WorkFolder.commit\n"
             "def slow(self, part):  # time for the parent to kill it between commits\n"
             "    commit(self, part); time.sleep(0.5)\n"
             "work.WorkFolder.commit = slow\n"
             "from empg_cli.config import AdvantageConfig, ScoreConfig\n"
             "from empg_cli.pipeline import score_file\n"
             "from pathlib import Path\n"
             f"score_file(Path(sys.argv[1]), Path(sys.argv[2]), ScoreConfig(model={cfg.model!r}), AdvantageConfig(), "
             f"chunk_tokens={CHUNK_TOKENS})\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", child, str(src), str(out)], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(_work(out).glob("part-*.parquet"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(list(_work(out).glob("part-*.parquet")))
    assert not out.exists() and committed >= 2
    assert main(["score", str(src), "--model", cfg.model]) == 0
    summary = capsys.readouterr().out
    resumed = int(summary.split("resumed")[1].split()[0].replace(",", ""))
    rescored = int(summary.split("rescored")[1].split()[0].replace(",", ""))
    total = pl.read_parquet(fresh)["n_response_tokens"].sum()
    assert 0 < resumed < pl.read_parquet(fresh).height and 0 < rescored < total
    _assert_same_table(out, fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.parquet", "in.parquet", "in.scored.parquet"]


def test_only_the_same_input_and_settings_reuse_committed_parts(tmp_path, case, monkeypatch):
    src, cfg, fresh = case
    out = tmp_path / "out.parquet"
    hotter = ScoreConfig(model=cfg.model, temperature=2.0)
    _interrupted(src, out, cfg, monkeypatch)
    summary = score_file(src, out, hotter, AdvantageConfig(), overwrite=True)  # another setting: starts over
    assert summary.resumed_steps == 0
    reference = tmp_path / "hot.parquet"
    score_file(src, reference, hotter, AdvantageConfig())
    _assert_same_table(out, reference)

    _interrupted(src, out, cfg, monkeypatch)
    rows = random_rollouts(np.random.default_rng(50), groups=4)
    rows["response_ids"][0] = [9] + rows["response_ids"][0][1:]
    other = write_rollouts(tmp_path / "in.parquet", rows)  # the same path, other content: starts over
    assert score_file(other, out, cfg, AdvantageConfig(), overwrite=True).resumed_steps == 0
    write_rollouts(tmp_path / "in.parquet", random_rollouts(np.random.default_rng(50), groups=4))

    _interrupted(src, out, cfg, monkeypatch)
    assert score_file(src, out, cfg, AdvantageConfig(), overwrite=True, resume=False).resumed_steps == 0
    _assert_same_table(out, fresh)

    _interrupted(src, out, cfg, monkeypatch)  # the same again, with another batch size: resumes
    summary = score_file(src, out, ScoreConfig(model=cfg.model, batch_tokens=64), AdvantageConfig(), overwrite=True)
    assert summary.resumed_steps > 0
    _assert_same_table(out, fresh)
    assert not _work(out).exists()


def test_a_damaged_or_half_written_part_is_found_and_redone(tmp_path, case, monkeypatch):
    src, cfg, fresh = case
    out = tmp_path / "out.parquet"
    _interrupted(src, out, cfg, monkeypatch, chunks=3)
    first, second, third = sorted(_work(out).glob("part-*.parquet"))
    kept = pl.read_parquet(first).height
    data = bytearray(second.read_bytes())
    data[len(data) // 3] ^= 0xFF  # a flipped byte inside a page: its checksum no longer matches
    second.write_bytes(bytes(data))
    third.write_bytes(third.read_bytes()[:len(data) // 2])  # cut short
    (_work(out) / "part-000004.parquet.tmp").write_bytes(b"PAR1 half a part")  # a kill during the write
    summary = score_file(src, out, cfg, AdvantageConfig())
    assert summary.resumed_steps == kept
    _assert_same_table(out, fresh)
    assert not _work(out).exists()
