"""Benchmark of `empg convert`: each trainer layout built at 100k steps, converted by the library call and by the
command (a fresh process, imports included, three runs); target: the command's median wall time under 2 s per 100k
steps.

    .venv/bin/python bench/convert.py           # prints the table, writes its section of bench/RESULTS.md
                                                # (`make bench` runs it after bench/run.py, which keeps it)
    .venv/bin/python bench/convert.py --quick   # 10k steps, report only printed (a smoke test of the script)

Layouts are written as the trainers write them (tests/ingest_layouts.py), with realistic field sizes: prompts of
~300 characters / 64 token ids, responses of ~120 characters / 24 ids, 8 samples per prompt, 4 turns per
trajectory for the multi-turn formats (prime-rl, ART, rLLM).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from empg_cli.ingest import convert_file  # noqa: E402
from ingest_layouts import prime_episode, prime_node, write_prime  # noqa: E402

PROMPT, RESPONSE, N, TURNS, FILES = "x" * 300, "y" * 120, 8, 4, 10
RUNS = 3
START, END = "<!-- convert:start -->", "<!-- convert:end -->"
"""The section of bench/RESULTS.md this script owns; the rest of the file is left as it is."""


def build_verl(root: Path, steps: int) -> tuple[Path, list[str]]:
    for f in range(FILES):
        rows = [{"input": f"{PROMPT}{i // N}", "output": RESPONSE, "gts": "42", "score": float(i % 2), "step": f,
                 "acc": bool(i % 2)} for i in range(steps // FILES)]
        (root / "verl").mkdir(exist_ok=True)
        (root / "verl" / f"{f}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root / "verl", []


def build_trl(root: Path, steps: int) -> tuple[Path, list[str]]:
    folder = root / "trl" / "completions"
    folder.mkdir(parents=True)
    n = steps // FILES
    for f in range(FILES):
        pd.DataFrame({"step": [f] * n, "prompt": [f"{PROMPT}{i // N}" for i in range(n)], "completion": [RESPONSE] * n,
                      "accuracy_reward": np.arange(n) % 2 * 1.0, "format_reward": np.ones(n),
                      "advantage": np.zeros(n)}).to_parquet(folder / f"completions_{f:05d}.parquet")
    return root / "trl", ["--group-size", str(N)]


def build_prime(root: Path, steps: int) -> tuple[Path, list[str]]:
    rng = np.random.default_rng(0)
    per_file = steps // TURNS // FILES
    for f in range(FILES):
        episodes = []
        for e in range(per_file):
            nodes = [prime_node(None, rng.integers(5, 3000, 64).tolist())]
            for t in range(TURNS):
                if t:
                    nodes.append(prime_node(len(nodes) - 1, [7] * 16))
                nodes.append(prime_node(len(nodes) - 1, [9] * 24, sampled=24))
            episodes.append(prime_episode(f"e{e}", f"g{e // N}", f, [{"nodes": nodes, "rewards": {
                "correct": {"score": float(e % 2), "weight": 1.0}}}]))
        write_prime(root / "prime", f, episodes)
    return root / "prime", []


def build_art(root: Path, steps: int) -> tuple[Path, list[str]]:
    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.string()),
                         ("tool_call_id", pa.string()), ("trainable", pa.bool_())])
    folder = root / "art" / "trajectories" / "train"
    folder.mkdir(parents=True)
    n = steps // TURNS // FILES
    messages = [{"role": "system", "content": PROMPT, "tool_calls": None, "tool_call_id": None, "trainable": None}]
    for _ in range(TURNS):
        messages += [{"role": "user", "content": PROMPT[:100], "tool_calls": None, "tool_call_id": None,
                      "trainable": None},
                     {"role": "assistant", "content": RESPONSE, "tool_calls": None, "tool_call_id": None,
                      "trainable": True}]
    for f in range(FILES):
        pq.write_table(pa.table({"group_index": pa.array(np.arange(n) // N),
                                 "trajectory_index": pa.array(np.arange(n) % N),
                                 "reward": pa.array(np.arange(n) % 2 * 1.0),
                                 "messages": pa.array([messages] * n, pa.list_(message))}), folder / f"{f:04d}.parquet")
    return root / "art", []


def build_rllm(root: Path, steps: int) -> tuple[Path, list[str]]:
    per_episode = TURNS * 2                                    # two agent trajectories per episode
    for f in range(FILES):
        folder = root / "rllm" / "episodes" / f"train_step_{f}_epoch_0"
        folder.mkdir(parents=True)
        for e in range(steps // per_episode // FILES):
            chat = [{"role": "user", "content": PROMPT}]
            trajectory_steps = []
            for _ in range(TURNS):
                trajectory_steps.append({"chat_completions": list(chat), "model_response": RESPONSE, "reward": 0.0})
                chat += [{"role": "assistant", "content": RESPONSE}, {"role": "user", "content": PROMPT[:100]}]
            (folder / f"episode_hash0_idt{e // N}_{e % N}.json").write_text(json.dumps({
                "training_step": f, "episode_id": f"t{e // N}:{e % N}", "trajectories": [
                {"uid": f"{e}-{a}", "reward": float(e % 2), "steps": trajectory_steps} for a in range(2)]}))
    return root / "rllm", []


def build_areal(root: Path, steps: int) -> tuple[Path, list[str]]:
    for f in range(FILES):
        folder = root / "areal" / "rollout" / str(f)
        folder.mkdir(parents=True)
        for task in range(steps // N // FILES):
            (folder / f"{task}.jsonl").write_text("".join(json.dumps(
                {"task_id": task, "sample_idx": i, "seqlen": 100, "prompt_len": 70, "head_version": f,
                 "tail_version": f, "reward": float(i % 2), "prompt": PROMPT, "completion": RESPONSE}) + "\n"
                for i in range(N)))
    return root / "areal", []


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


BUILDERS = {"verl": build_verl, "trl": build_trl, "prime-rl": build_prime, "art": build_art, "rllm": build_rllm,
            "areal": build_areal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps = 10_000 if args.quick else 100_000
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in BUILDERS.items():
            source, flags = build(Path(tmp), steps)
            started = time.perf_counter()
            summary = convert_file(source, Path(tmp) / f"{name}.lib.parquet", from_=name,
                                   group_size=N if name == "trl" else None)
            library = time.perf_counter() - started
            walls, cpus = [], []
            for _ in range(RUNS):
                started, cpu = time.perf_counter(), _children_cpu()
                subprocess.run([sys.executable, "-m", "empg_cli", "convert", str(source), "--from", name, *flags,
                                "-o", str(Path(tmp) / f"{name}.cli.parquet"), "--overwrite"], check=True,
                               capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                walls.append(time.perf_counter() - started)
                cpus.append(_children_cpu() - cpu)
            rows.append((name, summary.rows, summary.fidelity, library, walls, statistics.median(cpus)))
    load_end = os.getloadavg()
    lines = ["## empg convert (bench/convert.py)", "",
             f"Each layout built at {steps:,} steps, converted once by `convert_file` (library) and {RUNS} times by "
             "`empg convert` in a fresh process. Target: under 2 s per 100k steps. Load average "
             "(the 2 cores may be shared with other work) "
             f"{' '.join(f'{x:.2f}' for x in load_start)} at start, {' '.join(f'{x:.2f}' for x in load_end)} at end.",
             "", "The command's median wall time, imports included, is checked against the target (the fastest run is "
             "shown beside it: the spread is what other work on the machine added). CPU seconds "
             "are user + system of the command and the helper process that reads big prime-rl inputs alongside it.",
             "", "| format | steps | fidelity | library wall s | command wall s (median) | fastest | command CPU s "
             "| wall s per 100k steps | target < 2 s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, n, fidelity, library, walls, cpu in rows:
        per = statistics.median(walls) * 100_000 / n
        lines.append(f"| {name} | {n:,} | {fidelity} | {library:.2f} | {statistics.median(walls):.2f} | "
                     f"{min(walls):.2f} | {cpu:.2f} | {per:.2f} | {'pass' if per < 2 else 'FAIL'} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.quick:
        results = ROOT / "bench" / "RESULTS.md"
        text = results.read_text()
        section = f"{START}\n{report}{END}\n"
        if START in text and END in text:
            rest = text[text.index(END) + len(END):].lstrip("\n")
            text = text[:text.index(START)] + section + ("\n" + rest if rest else "")
        else:
            text = text.rstrip() + "\n\n" + section
        results.write_text(text)


if __name__ == "__main__":
    main()
