"""A generated corpus of malformed and adversarial inputs, one family per problem class, run through the CLI.

Every run: never exit 1, no traceback, the input unchanged, no output after an error, no NaN or inf in any
advantage written; each family has its expected exit code. Most cases run in process (`cli.main`); those that could
hang (a FIFO) run as subprocesses under a timeout. `python tests/test_fuzz_corpus.py` prints the outcome table.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from empg_cli.cli import main

SEEDS = 8
ADVANTAGES = ["adv_base", "empg_h_norm", "empg_g", "empg_f_next", "adv_empg", "aem_u_norm", "aem_w", "adv_aem"]


def rollouts(rng: np.random.Generator) -> dict[str, pa.Array]:
    """A small valid rollouts table: 2-4 groups of 1-3 trajectories of 1-4 steps, ids, rewards, logged entropies."""
    cols: dict[str, list] = {k: [] for k in ("iteration", "group_id", "traj_id", "step", "prompt_ids", "response_ids",
                                             "reward", "token_entropy")}
    for g in range(int(rng.integers(2, 5))):
        for t in range(int(rng.integers(1, 4))):
            reward = float(rng.integers(0, 2))
            for s in range(int(rng.integers(1, 5))):
                n = int(rng.integers(1, 5))
                cols["iteration"].append(int(g % 2))
                cols["group_id"].append(f"g{g}")
                cols["traj_id"].append(f"t{t}")
                cols["step"].append(s)
                cols["prompt_ids"].append([int(x) for x in rng.integers(0, 300, size=int(rng.integers(1, 6)))])
                cols["response_ids"].append([int(x) for x in rng.integers(0, 300, size=n)])
                cols["reward"].append(reward)
                cols["token_entropy"].append([float(x) for x in rng.gamma(2.0, 0.5, size=n)])
    types = {"iteration": pa.int64(), "step": pa.int64(), "prompt_ids": pa.list_(pa.int32()),
             "response_ids": pa.list_(pa.int32()), "reward": pa.float64(), "token_entropy": pa.list_(pa.float32())}
    return {k: pa.array(v, types.get(k)) for k, v in cols.items()}


def _write(path: Path, cols: dict, metadata: bytes | None = None) -> Path:
    table = pa.table(cols)
    if metadata is not None:
        table = table.replace_schema_metadata({b"empg": metadata})
    pq.write_table(table, path, write_page_checksum=True)
    return path


def _set(cols: dict, name: str, rng: np.random.Generator, value) -> dict:
    """`cols` with one random row of `name` set to `value` (for list columns: one element of it)."""
    values = cols[name].to_pylist()
    i = int(rng.integers(0, len(values)))
    if isinstance(values[i], list):
        values[i][int(rng.integers(0, len(values[i])))] = value
    else:
        values[i] = value
    return {**cols, name: pa.array(values, cols[name].type)}


def _scored(tmp: Path, rng: np.random.Generator) -> Path:
    src = _write(tmp / "src.parquet", rollouts(rng))
    out = tmp / "in.parquet"
    assert main(["score", str(src), "--entropy-source", "logged", "-o", str(out)]) == 0
    src.unlink()
    return out


def _scored_with(value) -> Callable[[Path, np.random.Generator], Path]:
    def build(tmp: Path, rng: np.random.Generator) -> Path:
        path = _scored(tmp, rng)
        table = pq.read_table(path)
        cols = {n: table.column(n).combine_chunks() for n in table.column_names}
        _write(path, _set(cols, "step_entropy", rng, value), table.schema.metadata[b"empg"])
        return path
    return build


def _rollouts_with(name: str, value) -> Callable[[Path, np.random.Generator], Path]:
    return lambda tmp, rng: _write(tmp / "in.parquet", _set(rollouts(rng), name, rng, value))


def _metadata(text: str) -> Callable[[Path, np.random.Generator], Path]:
    return lambda tmp, rng: _write(tmp / "in.parquet", rollouts(rng), text.encode())


def _corrupt(tmp: Path, rng: np.random.Generator) -> Path:
    path = _write(tmp / "in.parquet", rollouts(rng))
    data = bytearray(path.read_bytes())
    for i in rng.integers(4, len(data) - 4, size=3):
        data[int(i)] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _duplicated(tmp: Path, rng: np.random.Generator) -> Path:
    cols = rollouts(rng)
    table = pa.Table.from_arrays(list(cols.values()) + [cols["reward"]], names=list(cols) + ["reward"])
    pq.write_table(table, tmp / "in.parquet")
    return tmp / "in.parquet"


def _wide_iterations(tmp: Path, rng: np.random.Generator) -> Path:
    cols = rollouts(rng)
    low, high = [(-2 ** 63, 0), (0, 2 ** 64 - 1)][int(rng.integers(0, 2))]
    values = [high if i else low for i in cols["iteration"].to_pylist()]
    return _write(tmp / "in.parquet", {**cols, "iteration": pa.array(values, pa.uint64() if high > 0 else pa.int64())})


def _integer_ids(tmp: Path, rng: np.random.Generator) -> Path:
    cols = rollouts(rng)
    ids = {k: pa.array([int(v[1:]) for v in cols[k].to_pylist()], pa.int64()) for k in ("group_id", "traj_id")}
    return _write(tmp / "in.parquet", {**cols, **ids})


def _training_step(tmp: Path, rng: np.random.Generator) -> Path:
    cols = rollouts(rng)
    return _write(tmp / "in.parquet", {**cols, "step": pa.array([200] * len(cols["step"]), pa.int64())})


# family: (build the input, which commands, expected exit code)
SCORE, ADV, VALIDATE = ["score", "--entropy-source", "logged"], ["advantages"], ["validate"]
FAMILIES: dict[str, tuple[Callable, list[list[str]], int]] = {
    "valid": (lambda tmp, rng: _write(tmp / "in.parquet", rollouts(rng)), [SCORE, VALIDATE], 0),
    "integer ids": (_integer_ids, [SCORE], 0),
    "int64/uint64 extreme iterations": (_wide_iterations, [SCORE], 0),
    "step_entropy nan": (_scored_with(math.nan), [ADV, VALIDATE], 2),
    "step_entropy inf": (_scored_with(math.inf), [ADV, VALIDATE], 2),
    "step_entropy null": (_scored_with(None), [ADV, VALIDATE], 2),
    "step_entropy negative": (_scored_with(-0.25), [ADV, VALIDATE], 2),
    "reward nan/inf": (lambda tmp, rng: _rollouts_with("reward", [math.nan, math.inf, -math.inf][
        int(rng.integers(0, 3))])(tmp, rng), [SCORE, VALIDATE], 2),
    "null key": (lambda tmp, rng: _rollouts_with(["group_id", "traj_id", "step"][int(rng.integers(0, 3))], None)(
        tmp, rng), [SCORE, VALIDATE], 2),
    "null token id": (_rollouts_with("response_ids", None), [SCORE, VALIDATE], 2),
    "negative token id": (_rollouts_with("prompt_ids", -7), [SCORE, VALIDATE], 2),
    "token_entropy nan/inf/negative/null": (lambda tmp, rng: _rollouts_with("token_entropy", [
        math.nan, math.inf, -1.0, None][int(rng.integers(0, 4))])(tmp, rng), [SCORE, VALIDATE], 2),
    "null prompt row": (lambda tmp, rng: _write(tmp / "in.parquet", {**(c := rollouts(rng)), "prompt_ids": pa.array(
        [None] + c["prompt_ids"].to_pylist()[1:], c["prompt_ids"].type)}), [SCORE, VALIDATE], 2),
    "training step in step": (_training_step, [SCORE, VALIDATE], 2),
    "metadata invalid JSON": (_metadata('{"temperature": '), [SCORE, VALIDATE], 2),
    "metadata wrong types": (_metadata('{"temperature": "hot", "advantages": {"k": "x"}}'), [SCORE, VALIDATE], 2),
    "metadata temperature -1": (_metadata('{"temperature": -1}'), [SCORE], 2),
    "metadata deep JSON": (_metadata("[" * 100_000 + "]" * 100_000), [SCORE, VALIDATE], 2),
    "metadata model outside the folder": (_metadata('{"model": {"ref": "../elsewhere"}}'), [["score"]], 2),
    "duplicated column": (_duplicated, [SCORE, VALIDATE], 2),
    "corrupt bytes": (_corrupt, [SCORE, VALIDATE], None),  # 2, or 0 where the flip hit nothing read
}


def run_case(tmp: Path, family: str, seed: int) -> list[int]:
    """Build the family's input, run each command on it, check the invariants; the exit codes."""
    build, commands, expected = FAMILIES[family]
    rng = np.random.default_rng(seed)
    src = build(tmp, rng)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    codes = []
    for command in commands:
        out = tmp / "out.parquet"
        argv = [command[0], str(src), *command[1:]] + (["-o", str(out)] if command[0] != "validate" else [])
        code, err = _main(argv)
        codes.append(code)
        assert code != 1 and "Traceback" not in err, (family, argv, err)
        assert code == expected or (expected is None and code in (0, 2)), (family, argv, code, err)
        assert hashlib.sha256(src.read_bytes()).hexdigest() == before, (family, argv)
        if code == 0 and command[0] != "validate":
            written = pq.read_table(out)
            for name in ADVANTAGES:
                values = written.column(name).to_numpy(zero_copy_only=False).astype(float)
                assert np.isfinite(values).all(), (family, argv, name)
            out.unlink()
        elif code != 0:
            assert err.startswith("error: ") and not out.exists(), (family, argv, err)
            assert sorted(p.name for p in tmp.iterdir()) == [src.name], (family, argv)
    return codes


def _main(argv: list[str]) -> tuple[int, str]:
    """cli.main in process, with its stderr."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family(tmp_path, family):
    for seed in range(SEEDS):
        case = tmp_path / str(seed)
        case.mkdir()
        run_case(case, family, seed)


def test_files_that_are_not_regular_parquet_files(tmp_path):
    """A FIFO with no writer, a symlink loop, a text file and a folder without Parquet files: exit 2 at once, with a
    message that says what the path is (subprocesses under a timeout: a FIFO must not hang anything)."""
    fifo = tmp_path / "pipe.parquet"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.parquet"
    loop.symlink_to(loop)
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    expected = {fifo: f"error: {fifo} is a named pipe (FIFO); empg reads Parquet files, or folders or globs of them",
                loop: f"error: {loop}: cannot be read (too many levels of symbolic links)",
                text: f"error: {text}: is not a Parquet file",
                empty: f"error: {empty}: is a folder with no .parquet file under it"}
    for path, message in expected.items():
        for command in (["validate"], ["advantages"], ["score", "--entropy-source", "logged"]):
            run = subprocess.run([sys.executable, "-m", "empg_cli", command[0], str(path), *command[1:]],
                                 capture_output=True, text=True, timeout=60, cwd=tmp_path,
                                 env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
            assert run.returncode == 2 and run.stderr.strip() == message, (command, run.stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "loop.parquet", "passwd", "pipe.parquet"]


def test_metadata_messages_name_the_key_and_its_origin(tmp_path):
    rng = np.random.default_rng(0)
    cases = {'{"temperature": -1}': "its 'empg' metadata key 'temperature' is -1; it must be a number > 0 "
                                    "(or pass --temperature)",
             '{"temperature": "hot"}': "its 'empg' metadata key 'temperature' is \"hot\"; it must be a number > 0 "
                                       "(or pass --temperature)",
             '{"advantages": {"k": -2}}': "its 'empg' metadata key 'advantages.k' is out of range: must be >= 0; "
                                          "got -2",
             '{"model": {"ref": "../other"}}': None}
    for text, message in cases.items():
        path = _write(tmp_path / "in.parquet", rollouts(rng), text.encode())
        code, err = _main(["score", str(path)])
        assert code == 2
        if message is None:
            assert err == (f"error: {path}'s empg metadata names the model '../other', which is not a folder inside "
                           "the file's own folder; pass --model to choose the checkpoint\n")
        else:
            assert err == f"error: {path}: {message}\n"


def test_a_folder_or_glob_is_one_table_and_errors_name_the_file_and_its_row(tmp_path):
    rng = np.random.default_rng(3)
    cols = rollouts(rng)
    table = pa.table(cols)
    folder = tmp_path / "runs"
    folder.mkdir()
    n = table.num_rows
    cut = int(np.searchsorted(np.asarray(cols["group_id"].to_pylist()) != "g0", True))  # whole groups per file
    pq.write_table(table.slice(0, cut), folder / "a.parquet")
    pq.write_table(table.slice(cut), folder / "b.parquet")
    whole = _write(tmp_path / "whole.parquet", cols)
    assert _main(["score", str(whole), "--entropy-source", "logged"])[0] == 0
    assert _main(["score", str(folder), "--entropy-source", "logged"])[0] == 0
    glob = str(folder / "*.parquet")
    assert _main(["score", glob, "--entropy-source", "logged"]) == (
        2, f"error: the input {glob} is a glob: name the output with -o/--output\n")
    assert _main(["score", glob, "--entropy-source", "logged", "-o", str(tmp_path / "g.parquet")])[0] == 0
    want = pq.read_table(tmp_path / "whole.scored.parquet").select(ADVANTAGES)
    assert pq.read_table(tmp_path / "runs.scored.parquet").select(ADVANTAGES).equals(want)
    assert pq.read_table(tmp_path / "g.parquet").select(ADVANTAGES).equals(want)
    bad = table.slice(cut).to_pydict()
    bad["reward"][1] = math.nan
    pq.write_table(pa.table(bad, schema=table.schema), folder / "b.parquet")
    code, err = _main(["validate", str(folder)])
    assert code == 2 and err == f"error: {folder / 'b.parquet'}: column 'reward', row 1: reward is nan; must be a " \
                                "finite number\n", (err, n)


if __name__ == "__main__":  # the outcome table: exit codes per family
    import tempfile
    total = 0
    for family in FAMILIES:
        counts: Counter = Counter()
        for seed in range(SEEDS):
            with tempfile.TemporaryDirectory() as scratch:
                counts.update(run_case(Path(scratch), family, seed))
        total += sum(counts.values())
        print(f"{family:40s} {SEEDS:3d} inputs  " + "  ".join(f"exit {k}: {v}" for k, v in sorted(counts.items())))
    print(f"{len(FAMILIES) * SEEDS} inputs, {total} runs")
