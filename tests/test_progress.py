"""Progress on a log (stderr not a terminal): plain lines, throttled to one per 10 s, one a minute at least."""

from __future__ import annotations

import numpy as np

from conftest import random_rollouts, write_rollouts
from empg_cli.cli import main
from empg_cli.progress import ProgressLines


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_at_most_every_10_s_and_at_least_every_minute():
    clock, lines = Clock(), []
    progress = ProgressLines(lines.append, clock)
    progress.start(1000, 100)
    progress.note("loading ckpt/step_0")
    for _ in range(9):  # nothing in the first 10 s: a run that ends (or fails) at once leaves a clean log
        clock.now += 1.0
        progress.advance(10, 500)
    assert lines == []
    for _ in range(10):  # a batch of 10 steps every second: a line every 10 s, not every batch
        clock.now += 1.0
        progress.advance(10, 500)
    # 10 s after start, 100 steps were done this run at 500 tokens/s; 800 left at 10 steps/s
    assert lines == ["rescoring 1,000 steps, 100 resumed from a previous run", "loading ckpt/step_0",
                     "200/1,000 steps (20%), 500 tokens/s, 0:01:20 left"]
    progress.note("loading ckpt/step_1")  # later notes are written at once
    assert lines[-1] == "loading ckpt/step_1"
    clock.now += 5.0  # 14 s after the last line: a heartbeat alone does not write yet ...
    progress.tick()
    assert len(lines) == 4
    clock.now += 46.0  # ... but it does once a minute has passed without a line (one long batch)
    progress.tick()
    assert len(lines) == 5 and lines[-1].startswith("290/1,000 steps (29%)")
    progress.tick()
    assert len(lines) == 5


def test_a_run_logged_to_a_file_says_what_it_loads_and_does(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import empg_cli.progress
    monkeypatch.setattr(empg_cli.progress, "MIN_INTERVAL_S", 0.0)  # this short run as if it were a long one
    src = write_rollouts(tmp_path / "in.parquet", random_rollouts(np.random.default_rng(60), groups=1))
    assert main(["score", str(src), "--model", str(tiny_model_dir)]) == 0
    log = capsys.readouterr().err.splitlines()
    steps = len(random_rollouts(np.random.default_rng(60), groups=1)["run"])
    assert log[:2] == [f"rescoring {steps:,} steps", f"loading {tiny_model_dir}"]
    assert log[-1].startswith(f"{steps}/{steps} steps (100%), ") and log[-1].endswith(" tokens/s, 0:00:00 left")
    assert all("\x1b" not in line and "\r" not in line for line in log)  # no terminal control codes
