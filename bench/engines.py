"""Engines bench: the Ray engine with 1 and 2 single-thread CPU workers against the local engine on one thread, on
the same case in one run, and the time a resumed run saves after a kill -9. Beside them, two local runs at once, each
on half the groups: what two independent workers can reach on this machine, the ceiling for the 2-worker ratio.

    make bench-engines                          # = .venv/bin/python bench/engines.py: writes the "Engines" section
                                                # of bench/RESULTS.md (about 13 minutes on 2 quiet cores)
    .venv/bin/python bench/engines.py --quick   # a small case; prints the section only

Throughput is response tokens per second of `empg score` end to end, as a user runs it, in a process of its own
(imports, read, plan, start the actors and load the policy in each, score, commit, advantages, write); the local
Ray cluster, which the Ray runs attach to (RAY_ADDRESS), is started once beforehand and its start-up (with Ray
Data's own helper actors, made by the first job on a cluster) is reported apart. Runs of one engine setting
interleave with the others' (round robin, each round starting one setting later, best of REPEATS): a shared
machine's speed drifts by 10-20 % over minutes, and interleaving lets the drift hit all settings alike; the load
average is recorded beside the figures. The GPU rows (workers = GPUs) are in `bench/run.py --gpu`, which calls
`measure` below.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from data import ModelSpec, build_model, multi_turn  # noqa: E402

from empg_cli.output import sidecar  # noqa: E402

BENCH = Path(__file__).resolve().parent
START, END = "<!-- engines:start -->", "<!-- engines:end -->"
"""The section's markers in bench/RESULTS.md: bench/run.py keeps what lies between them when it rewrites the rest."""
REPEATS = 5
ALL_RUNS: dict[str, list[float]] = {}
"""Every timed run of the last `measure`, name -> seconds: under load their spread says how far to trust the best."""
MODEL = ModelSpec("engines-32k", vocab_size=32_000, hidden_size=256, num_layers=6, intermediate_size=768,
                  num_heads=4, num_kv_heads=2, max_positions=8192)


def case(work: Path, trajectories: int) -> tuple[Path, Path, int, tuple[Path, Path]]:
    """The scoring-32k model and prefix-chained multi-turn trajectories: (model folder, rollouts file, response
    tokens, the same rows in two files of whole groups with about half the tokens each)."""
    model_dir = work / MODEL.name
    model_dir.mkdir(exist_ok=True)
    build_model(MODEL, model_dir)
    rollouts = multi_turn(np.random.default_rng(7), MODEL.vocab_size, trajectories=trajectories, group_size=4,
                          steps=(6, 10), first_prompt=(96, 192), response=(16, 64), observation=(48, 128))
    split = tuple(rollouts.write(work / f"engines.half{i}.parquet", rows) for i, rows in enumerate(halves(rollouts)))
    return model_dir, rollouts.write(work / "engines.parquet"), rollouts.n_response_tokens, split


def halves(rollouts) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers (file order) of two sets of whole groups with about the same tokens to score: largest group first
    into the lighter half. A group's tokens are its trajectories' full sequences (one trajectory is scored as one
    sequence)."""
    groups = np.asarray(rollouts.columns["group_id"])
    first_row = np.cumsum([0] + [len(spans) for spans in rollouts.response_spans])[:-1]
    tokens: dict[str, int] = {}
    for row, sequence in zip(first_row, rollouts.sequences):
        tokens[groups[row]] = tokens.get(groups[row], 0) + len(sequence)
    load, members = [0, 0], [[], []]
    for group in sorted(tokens, key=tokens.get, reverse=True):
        lighter = int(load[1] < load[0])
        load[lighter] += tokens[group]
        members[lighter].append(group)
    return tuple(np.flatnonzero(np.isin(groups, m)) for m in members)


def empg_score(src: Path, out: Path, model_dir: Path, device: str, options: dict) -> subprocess.Popen:
    """`empg score` as a user runs it, in a process of its own, on one torch thread (the local engine; each Ray
    worker sets its own), attached to this process's Ray cluster when there is one."""
    flags = [x for key, value in options.items()
             for x in [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")]))
    import ray
    if ray.is_initialized():
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return subprocess.Popen([sys.executable, "-m", "empg_cli", "score", str(src), "-o", str(out), "--model",
                             str(model_dir), "--device", device, "--overwrite", *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    """The run's output; a failed run stops the bench with it."""
    output = proc.communicate()[0]
    if proc.returncode:
        sys.exit(f"empg score failed ({proc.returncode}):\n{output}")
    return output


def measure(model_dir: Path, runs: dict[str, list[tuple[Path, dict]]], device: str = "cpu",
            repeats: int = REPEATS) -> dict[str, float]:
    """Best wall seconds per named setting, interleaved; a setting is one or more `empg score` runs (input, flags)
    started together, timed until the last one ends."""
    best: dict[str, float] = {}
    ALL_RUNS.clear()
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            started = time.perf_counter()
            procs = [empg_score(src, src.with_name(f"{src.stem}.{r}.scored.parquet"), model_dir, device,
                                {**options, "no_resume": True}) for src, options in runs[name]]
            for proc in procs:
                finish(proc)
            seconds = time.perf_counter() - started
            best[name] = min(best.get(name, seconds), seconds)
            ALL_RUNS.setdefault(name, []).append(seconds)
            print(f"    {name:<24} run {r + 1}/{repeats}: {seconds:8.2f} s", flush=True)
    return best


def resumed_saving(src: Path, model_dir: Path, full_s: float) -> dict[str, float]:
    """Kill -9 a local run half-way through its expected time, rerun the same command: what the rerun took."""
    out = src.with_name("killed.scored.parquet")
    proc = empg_score(src, out, model_dir, "cpu", {})
    started = time.perf_counter()
    time.sleep(full_s / 2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()  # drains and closes its pipe
    killed_at = time.perf_counter() - started
    parts = len(list(sidecar(out, "work").glob("part-*.parquet")))
    started = time.perf_counter()
    output = finish(empg_score(src, out, model_dir, "cpu", {}))
    resumed = re.search(r"resumed\s+([\d,]+) steps", output)
    return {"killed_at": killed_at, "parts": parts, "rerun": time.perf_counter() - started,
            "resumed": int(resumed.group(1).replace(",", "")) if resumed else 0,
            "steps": pl.scan_parquet(out).select(pl.len()).collect().item()}


def section(info: dict, tokens: int, best: dict[str, float], resume: dict[str, float]) -> str:
    local, one, two = best["local, 1 thread"], best["ray, 1 worker"], best["ray, 2 workers"]
    pair = best["local x2, halves"]
    scaling, overhead, ceiling = one / two, one / local - 1, local / pair
    rate = lambda s: f"{tokens / s:,.0f} tok/s"  # noqa: E731
    lines = [
        START, "## Engines: Ray workers and resume (bench/engines.py)", "",
        f"Written by `bench/engines.py` on {info['when']}; {info['case']}. Load average before: {info['load_before']}, "
        f"after: {info['load_after']} (the 2 cores are shared with other work: rerun on a quiet machine for clean "
        f"figures). Local Ray cluster start-up with Ray Data's helper actors, once, not counted below: "
        f"{info['ray_start']:.1f} s.", "",
        "| engine | seconds | throughput | ratio | target | result |", "|---|---|---|---|---|---|",
        f"| local, 1 torch thread | {local:.1f} | {rate(local)} |  |  |  |",
        f"| ray, 1 single-thread CPU worker | {one:.1f} | {rate(one)} | overhead {overhead:+.0%} vs local | "
        f"<= +15% | {'PASS' if overhead <= 0.15 else 'FAIL'} |",
        f"| ray, 2 single-thread CPU workers | {two:.1f} | {rate(two)} | {scaling:.2f}x one worker | >= 1.7x | "
        f"{'PASS' if scaling >= 1.7 else 'FAIL'} |",
        f"| local, 1 thread, two processes at once, each on half the groups | {pair:.1f} | {rate(pair)} | "
        f"{ceiling:.2f}x one local process; ray on 2 workers reaches {pair / two:.0%} of this |  |  |",
        f"| local, killed (kill -9) at {resume['killed_at']:.1f} s, then rerun | {resume['rerun']:.1f} | | "
        f"resumed {resume['resumed']:,} of {resume['steps']:,} steps ({resume['parts']} parts); the rerun took "
        f"{resume['rerun'] / local:.0%} of an uninterrupted run |  |  |", "",
        per_round(), "",
        "Each run is `empg score` in a process of its own; a Ray run also starts its actors, which import torch and "
        "transformers and load the policy (a few seconds) inside the timed run: that is the overhead on one worker. "
        "The two local processes on halves of the input (whole groups, about the same tokens each) are what two "
        "independent workers can reach on this machine, start-up included: two busy cores of this VM do not give "
        "independent processes twice one core's throughput (shared caches and memory bandwidth, other guests on the "
        "host), so this row is the ceiling to read the 2-worker ratio against. "
        "All timed runs (seconds, in order): "
        + "; ".join(f"{k} " + ", ".join(f"{x:.1f}" for x in v) for k, v in ALL_RUNS.items())
        + ". Rerun: `make bench-engines`.", END, ""]
    return "\n".join(lines)


def per_round() -> str:
    """The ratios within each round, whose runs are minutes apart, against the drift across rounds."""
    runs = {name: np.asarray(seconds) for name, seconds in ALL_RUNS.items()}
    local, one, two, pair = (runs[k] for k in ("local, 1 thread", "ray, 1 worker", "ray, 2 workers",
                                                "local x2, halves"))

    def spread(values: np.ndarray, form: str) -> str:
        return f"median {form.format(np.median(values))} ({form.format(values.min())} to {form.format(values.max())})"
    return (f"The same ratios within each of the {len(local)} rounds (the runs of a round follow one another; across "
            f"rounds the local run took {local.min():.1f} to {local.max():.1f} s): 2 workers vs 1 "
            f"{spread(one / two, '{:.2f}x')}; two local processes vs one {spread(local / pair, '{:.2f}x')}; ray on 2 "
            f"workers vs the two local processes {spread(pair / two, '{:.0%}')}; one worker vs local "
            f"{spread(one / local - 1, '{:+.0%}')}.")


def write_section(text: str) -> Path:
    """Replace the Engines section of bench/RESULTS.md (between its markers), or append it."""
    path = BENCH / "RESULTS.md"
    current = path.read_text() if path.exists() else ""
    start, end = current.find(START), current.find(END)
    if 0 <= start < end:
        current = current[:start] + text.rstrip("\n") + current[end + len(END):]
    else:
        current = current.rstrip("\n") + "\n\n" + text
    path.write_text(current)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small case; print the section, write nothing")
    parser.add_argument("--trajectories", type=int, default=None, help="case size (default 192, quick 8)")
    args = parser.parse_args()
    import ray
    import ray.data
    trajectories = args.trajectories or (8 if args.quick else 192)
    info = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="empg-engines-") as tmp:
        model_dir, src, tokens, split = case(Path(tmp), trajectories)
        info["case"] = (f"{trajectories} prefix-chained trajectories of 6-10 steps, {tokens:,} response tokens, "
                        f"{MODEL.describe()}, float32 on the CPU, default chunk sizes")
        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.range(2).map_batches(lambda batch: batch).materialize()  # Ray Data's helper actors
        info["ray_start"] = time.perf_counter() - started
        runs = {"local, 1 thread": [(src, {})], "ray, 1 worker": [(src, {"engine": "ray", "workers": 1})],
                "ray, 2 workers": [(src, {"engine": "ray", "workers": 2})],
                "local x2, halves": [(half, {}) for half in split]}
        best = measure(model_dir, runs, repeats=1 if args.quick else REPEATS)
        ray.shutdown()
        resume = resumed_saving(src, model_dir, best["local, 1 thread"])
    info["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = section(info, tokens, best, resume)
    print("\n" + text)
    if not args.quick:
        print(f"wrote {write_section(text)}")


if __name__ == "__main__":
    main()
