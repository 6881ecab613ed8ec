"""Writing outputs safely: checks up front, one writer per path, never replacing what appeared meanwhile, clean
interrupts and kills, umask permissions, page checksums."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import empg_cli.pipeline as pipeline
from conftest import random_rollouts, write_rollouts
from empg_cli.cli import main
from empg_cli.errors import OutputExists
from empg_cli.output import atomic_output, sidecar, write_parquet

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _logged_rollouts(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = random_rollouts(rng)
    rows["token_entropy"] = [rng.random(len(r)).astype(np.float32).tolist() for r in rows["response_ids"]]
    return write_rollouts(path, rows)


def _big_rollouts(path: Path, n: int) -> Path:
    """n one-step trajectories with logged entropies: enough rows that logged scoring takes a second or two."""
    rng = np.random.default_rng(0)
    offsets = pa.array(np.concatenate([[0], np.cumsum(rng.integers(1, 40, n))]).astype(np.int32))
    ids = pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 300, offsets[-1].as_py()).astype(np.int32)))
    entropy = pa.ListArray.from_arrays(offsets, pa.array(rng.random(offsets[-1].as_py()).astype(np.float32)))
    i = np.arange(n)
    pq.write_table(pa.table({"group_id": (i // 8).astype(str), "traj_id": (i % 8).astype(str),
                             "step": np.zeros(n, np.int64), "prompt_ids": ids, "response_ids": ids,
                             "reward": rng.random(n), "token_entropy": entropy}), path)
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".empg-"))


@pytest.fixture
def src(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    return _logged_rollouts(folder / "runs.parquet")


@pytest.fixture
def nothing_read(monkeypatch):
    """Fail the test if the input is read: errors about the output must come before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the input was read before the output was checked")
    monkeypatch.setattr(pipeline, "open_rollouts", refuse)
    monkeypatch.setattr(pipeline, "open_source", refuse)


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot create files in: read-only mode, and immutable when running as root."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        (folder / "probe").touch()
    except OSError:
        pass
    else:
        pytest.skip("cannot make a folder unwritable here (root without chattr)")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


@pytest.mark.parametrize("case", ["folder", "device", "fifo", "missing folder", "name too long", "unwritable"])
def test_output_problems_are_found_before_any_work(tmp_path, capsys, src, nothing_read, request, case):
    out = tmp_path / "out"
    out.mkdir()
    if case == "folder":
        target, fragment = out, "is a folder"
    elif case == "device":
        target, fragment = Path(os.devnull), "is not a regular file"
    elif case == "fifo":
        target, fragment = out / "pipe.parquet", "is not a regular file"
        os.mkfifo(target)
    elif case == "missing folder":
        target, fragment = out / "nowhere" / "x.parquet", "does not exist"
    elif case == "name too long":
        target, fragment = out / ("a" * 300), "is 300 bytes"
    else:
        target, fragment = request.getfixturevalue("unwritable") / "x.parquet", "cannot write in the output folder"
    before = sorted(p.name for p in target.parent.iterdir()) if target.parent.is_dir() else None
    code, _, err = run_cli(capsys, "score", src, "--entropy-source", "logged", "-o", target, "--overwrite")
    assert code == 2 and err.count("\n") == 1 and fragment in err, err
    if before is not None:
        assert sorted(p.name for p in target.parent.iterdir()) == before
    assert sorted(p.name for p in src.parent.iterdir()) == ["runs.parquet"]


def test_a_legal_long_output_name_works(tmp_path, capsys, src):
    target = tmp_path / ("a" * 237 + ".parquet")  # 245 bytes: the temp name must not add to it
    code, _, err = run_cli(capsys, "score", src, "--entropy-source", "logged", "-o", target)
    assert code == 0, err
    assert pq.read_table(target).num_rows == pq.read_table(src).num_rows
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_output_permissions_follow_the_umask(tmp_path, capsys, src, mask, mode):
    previous = os.umask(mask)
    try:
        code, _, err = run_cli(capsys, "score", src, "--entropy-source", "logged", "-o", tmp_path / "out.parquet")
    finally:
        os.umask(previous)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "out.parquet").stat().st_mode) == mode


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_appears_meanwhile_is_replaced_only_with_overwrite(tmp_path, capsys, src, monkeypatch,
                                                                          overwrite):
    target = tmp_path / "out.parquet"
    scoring = pipeline._logged_statistics

    def another_writer_finishes_first(*args, **kwargs):
        target.write_bytes(b"theirs")
        return scoring(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_logged_statistics", another_writer_finishes_first)
    flags = ["--overwrite"] if overwrite else []
    code, _, err = run_cli(capsys, "score", src, "--entropy-source", "logged", "-o", target, *flags)
    if overwrite:
        assert code == 0, err
        assert pq.read_table(target).num_rows == pq.read_table(src).num_rows
    else:
        assert code == 2 and "appeared while this run was writing it; it was left unchanged" in err, err
        assert target.read_bytes() == b"theirs"
    assert _leftovers(tmp_path) == []


def test_without_hard_links_the_commit_still_refuses_to_replace(tmp_path, monkeypatch):
    """Filesystems without hard links (FAT, some shares) fall back to check-then-rename."""
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "out.txt"
    with atomic_output(target) as temp:
        temp.write_text("mine")
    assert target.read_text() == "mine"
    with pytest.raises(OutputExists, match="appeared while"):
        with atomic_output(tmp_path / "late.txt") as temp:
            (tmp_path / "late.txt").write_text("theirs")
            temp.write_text("mine")
    assert (tmp_path / "late.txt").read_text() == "theirs" and _leftovers(tmp_path) == []


def test_a_second_writer_to_the_same_path_fails_at_once(tmp_path, capsys, src):
    target = tmp_path / "out.parquet"
    with atomic_output(target) as temp:
        started = time.monotonic()
        code, _, err = run_cli(capsys, "score", src, "--entropy-source", "logged", "-o", target, "--overwrite")
        assert code == 2 and err == f"error: another empg run is writing {target}; wait for it to finish or " \
                                    f"choose another -o\n"
        assert time.monotonic() - started < 5
        temp.write_text("first")
    assert target.read_text() == "first" and _leftovers(tmp_path) == []


def test_dead_runs_files_are_removed_and_live_ones_kept(tmp_path):
    dead, live = tmp_path / "dead.parquet", tmp_path / "live.parquet"
    sidecar(dead, "tmp").write_bytes(b"half-written")  # as a SIGKILLed run leaves them: lock file free
    sidecar(dead, "lock").touch()
    with atomic_output(live) as live_temp:
        live_temp.write_text("in progress")
        with atomic_output(tmp_path / "next.txt") as temp:
            temp.write_text("done")
        assert _leftovers(tmp_path) == sorted([sidecar(live, "lock").name, live_temp.name])
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.parquet", "next.txt"]


def test_plot_out_dir_that_is_a_file_is_bad_usage(tmp_path, capsys, src):
    scored, out_dir = tmp_path / "runs.scored.parquet", tmp_path / "plots"
    assert run_cli(capsys, "score", src, "--entropy-source", "logged", "-o", scored)[0] == 0
    out_dir.write_text("not a folder")
    code, _, err = run_cli(capsys, "plot", "dynamics", scored, "--out-dir", out_dir)
    assert (code, err) == (2, f"error: --out-dir {out_dir} is a file, not a folder\n")


def test_parquet_carries_page_checksums(tmp_path):
    path, values = tmp_path / "t.parquet", np.arange(1000, dtype=np.float64)
    assert write_parquet(path, [pa.table({"x": values})]) == 1000
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # flipped bits in the first data page
    path.write_bytes(bytes(data))
    unverified = pq.read_table(path, page_checksum_verification=False).column("x").to_numpy()
    assert (unverified != values).sum() == 1  # silently wrong when nobody checks
    with pytest.raises(OSError, match="CRC"):
        pq.read_table(path, page_checksum_verification=True)


def test_text_columns_get_dictionaries_and_numbers_do_not(tmp_path):
    """Dictionaries for every text leaf, nested ones included; token ids and floats plain; values round-trip."""
    message = pa.struct([("role", pa.string()), ("content", pa.large_string())])
    table = pa.table({"traj_id": pa.array(["a", "a", "b"], pa.large_string()),
                      "messages": pa.array([[{"role": "user", "content": "hi"}]] * 3, pa.large_list(message)),
                      "response_ids": pa.array([[1, 2], [3], []], pa.large_list(pa.int32())),
                      "step_entropy": pa.array([0.5, 1.5, 2.5])})
    write_parquet(tmp_path / "t.parquet", [table])
    meta = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0)
    dictionary = {meta.column(i).path_in_schema: "RLE_DICTIONARY" in meta.column(i).encodings
                  for i in range(meta.num_columns)}
    assert dictionary == {"traj_id": True, "messages.list.element.role": True, "messages.list.element.content": True,
                          "response_ids.list.element": False, "step_entropy": False}
    assert pq.read_table(tmp_path / "t.parquet").equals(table)


# Subprocess trials: real processes, real signals, real races.

def _empg(*args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "empg_cli", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as if not `cmd &`


def test_two_racing_writers_exactly_one_wins(tmp_path, src):
    target = tmp_path / "out.parquet"
    runs = [_empg("score", src, "--entropy-source", "logged", "-o", target) for _ in range(2)]
    results = [(run.wait(timeout=60), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert loser.count("\n") == 1 and ("another empg run is writing" in loser or "exists; pass --overwrite" in loser)
    assert pq.read_table(target).num_rows == pq.read_table(src).num_rows and _leftovers(tmp_path) == []


ROWS = 200_000
"""Rows of the big file: logged scoring of it takes over a second after its temp file appears, long enough to
signal it mid-way even when this test's own process waits a while for a core (60k rows, half a second since the
advantages got faster, once lost that race on two busy cores)."""


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    return _big_rollouts(tmp_path_factory.mktemp("big") / "big.parquet", ROWS)


def _wait_for(check, run: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while not check():
        assert run.poll() is None, f"the run ended before {what}: {run.stderr.read()}"
        assert time.monotonic() < deadline, f"no {what} after 30 s"
        time.sleep(0.005)


@pytest.mark.parametrize("signum, moment", [(signal.SIGKILL, "writing"), (signal.SIGTERM, "scoring"),
                                            (signal.SIGINT, "writing"), (signal.SIGHUP, "scoring")])
def test_killed_runs_leave_the_old_output_and_no_leftovers(tmp_path, src, big, signum, moment):
    target = tmp_path / "out.parquet"
    target.write_bytes(b"older output")
    run = _empg("score", big, "--entropy-source", "logged", "-o", target, "--overwrite")
    temp = sidecar(target, "tmp")
    if moment == "scoring":  # checks passed, input being read and scored
        _wait_for(temp.exists, run, "temp file")
    else:  # the scored table is being written
        _wait_for(lambda: temp.exists() and temp.stat().st_size > 0, run, "written bytes")
    run.send_signal(signum)
    code, err = run.wait(timeout=60), run.stderr.read()
    assert target.read_bytes() == b"older output", (code, err)
    if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL and _leftovers(tmp_path)  # nothing can clean up after SIGKILL...
        rerun = _empg("score", src, "--entropy-source", "logged", "-o", target, "--overwrite")
        assert rerun.wait(timeout=60) == 0, rerun.stderr.read()  # ...so the next run does
        assert pq.read_table(target).num_rows == pq.read_table(src).num_rows
    else:
        assert (code, err) == (128 + signum, "interrupted\n")
    assert _leftovers(tmp_path) == []
