"""empg's benchmark: rescoring speed, accuracy and memory, and advantage throughput, in one run on one machine.

    .venv/bin/python bench/run.py            # full run, writes bench/RESULTS.md (about 10 minutes on 2 cores)
    .venv/bin/python bench/run.py --quick    # small sizes, report to $TMPDIR (a smoke test of the script)
    .venv/bin/python bench/run.py --gpu      # the cuda cases only, on a machine with a GPU: bench/RESULTS_GPU.md

Cases (one function each, deterministic seeds, random models saved as safetensors in a temp dir):
  multi-turn   prefix-chained agent trajectories, 32k-vocab model: empg `score_file` vs the naive trainer-style
               scorer (bench/naive.py) and vs bare forward passes over exactly the sequences empg scores
  grpo         single-turn GRPO groups (no prefix to share), same comparisons
  memory       one 16k-token trajectory, 152k-vocab model: peak RSS of `score_file` in a fresh process
  advantages   10M steps: `advantage_table` vs a per-row Python loop (bench/loop.py)
  engines      (bench/engines.py, its own section of RESULTS.md) the Ray engine on 1 and 2 CPU workers vs local; resume
  gpu          (--gpu) a model of Qwen2.5-0.5B's shapes in bfloat16 on cuda: multi-turn speed vs the naive scorer and
               the forward floors on the same GPU, float32 agreement, peak GPU memory on a 16k-token trajectory, and
               `--engine ray` with one worker per GPU against the local engine on one
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from data import ModelSpec, Rollouts, advantage_frame, build_model, multi_turn, single_turn_groups  # noqa: E402
from loop import loop_advantages  # noqa: E402
from naive import naive_step_entropies  # noqa: E402

from empg_cli.advantages import ADVANTAGE_COLUMNS, advantage_table  # noqa: E402
from empg_cli.config import AdvantageConfig, ScoreConfig  # noqa: E402
from empg_cli.pipeline import Progress, score_file  # noqa: E402
from empg_cli.scoring import token_budget_batches  # noqa: E402

BENCH = Path(__file__).resolve().parent
THREADS = 2
JUDGED_FLOOR = "model(input_ids)"  # the "bare model(input_ids) forward over the same tokens"
BATCH_TOKENS = ScoreConfig().batch_tokens  # empg's default token budget, used for empg and the forward floors
NAIVE_BATCH = 4                            # rows per naive micro-batch (a trainer's log-prob micro-batch size)
REPEATS = 3                                # best of 3 after one warm-up, interleaved across runners
LONG_RUN_S = 60.0                          # ... except that a runner taking a minute or more runs once
GIB = 2 ** 30

SCORING_MODEL = ModelSpec("scoring-32k", vocab_size=32_000, hidden_size=256, num_layers=6, intermediate_size=768,
                          num_heads=4, num_kv_heads=2, max_positions=4096)
GPU_MODEL = ModelSpec("gpu-0.5b", vocab_size=151_936, hidden_size=896, num_layers=24, intermediate_size=4864,
                      num_heads=14, num_kv_heads=2, max_positions=32768)  # the shapes of Qwen2.5-0.5B
MEMORY_MODEL = ModelSpec("memory-152k", vocab_size=151_936, hidden_size=256, num_layers=2, intermediate_size=768,
                         num_heads=4, num_kv_heads=2, max_positions=32768)


@dataclass
class Row:
    """One line of the results table."""

    case: str
    what: str
    seconds: float | None = None
    throughput: str = ""
    ratio: str = ""
    target: str = ""
    ok: bool | None = None

    def cells(self) -> list[str]:
        verdict = "" if self.ok is None else ("PASS" if self.ok else "FAIL")
        seconds = "" if self.seconds is None else f"{self.seconds:.3f}" if self.seconds < 10 else f"{self.seconds:.1f}"
        return [self.case, self.what, seconds, self.throughput, self.ratio, self.target, verdict]


# ------------------------------------------------------------------------------------------------
# Timing helpers
# ------------------------------------------------------------------------------------------------

ALL_RUNS: dict[str, list[float]] = {}
"""Every timed run, '<case>: <runner>' -> seconds, for the report."""


def best_of(case: str, runners: dict[str, Callable[[], Any]], repeats: dict[str, int]) -> dict[str, tuple[float, Any]]:
    """Best wall time (perf_counter) of each runner over its repeats; runners interleave so load hits all alike.

    A runner whose runs so far took LONG_RUN_S or more is not repeated (a long case: one run is enough).
    """
    best: dict[str, tuple[float, Any]] = {}
    spent = dict.fromkeys(runners, 0.0)
    for r in range(max(repeats.values())):
        for name, fn in runners.items():
            if r >= repeats[name] or spent[name] >= LONG_RUN_S:
                continue
            gc.collect()
            started = time.perf_counter()
            result = fn()
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            spent[name] += seconds
            ALL_RUNS.setdefault(f"{case}: {name}", []).append(seconds)
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, result)
            print(f"    {name:<28} run {r + 1}/{repeats[name]}: {seconds:8.3f} s", flush=True)
    return best


def run_empg(src: Path, dst: Path, model_dir: Path, device: str = "cpu", dtype: str = "float32",
             batch_tokens: int = BATCH_TOKENS, **options: Any) -> dict[str, float]:
    """score_file end to end, with a breakdown from the progress callbacks (the library never prints)."""
    marks: dict[str, float] = {}
    progress = Progress(start=lambda *_: marks.setdefault("start", time.perf_counter()),
                        note=lambda message, *_: marks.setdefault(message.split()[0], time.perf_counter()),
                        advance=lambda *_: marks.__setitem__("scored", time.perf_counter()))
    started = time.perf_counter()
    score_file(src, dst, ScoreConfig(model=str(model_dir), device=device, dtype=dtype, batch_tokens=batch_tokens),
               AdvantageConfig(), overwrite=True, progress=progress, **options)
    ended = time.perf_counter()
    return {"read+validate": marks["loading"] - started, "load model": marks["loaded"] - marks["loading"],
            "tokens+plan+score_units": marks["scored"] - marks["loaded"],
            "statistics+advantages+write": ended - marks["scored"]}


def forward_floor(model, rollouts: Rollouts, mode: str) -> int:
    """Forward passes over exactly the sequences empg scores, in empg's own token-budget batches (right-padded,
    attention mask, longest first), without any entropy work. Returns the token slots processed (padding included).

    mode `decoder`: model.model(...) last hidden state only (no LM head);
    `decoder+head@responses`: that plus lm_head at the positions that predict response tokens (no softmax);
    `model(input_ids)`: the full model with logits at every position (float32 on the CPU, the model's dtype on cuda).
    """
    lengths = np.array([len(s) for s in rollouts.sequences])
    slots = 0
    for members in token_budget_batches(lengths, BATCH_TOKENS):
        width = int(lengths[members].max())
        ids = torch.zeros((len(members), width), dtype=torch.long)
        mask = torch.zeros((len(members), width), dtype=torch.long)
        rows, positions = [], []
        for b, i in enumerate(members):
            ids[b, :lengths[i]] = torch.from_numpy(rollouts.sequences[i].astype(np.int64))
            mask[b, :lengths[i]] = 1
            for start, n in rollouts.response_spans[i]:
                rows.append(np.full(n, b))
                positions.append(np.arange(start - 1, start + n - 1))
        slots += ids.numel()
        ids, mask = ids.to(model.device), mask.to(model.device)
        with torch.inference_mode():
            if mode == "model(input_ids)":
                model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, L, V)
                continue
            hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, L, d)
            if mode == "decoder+head@responses":
                model.lm_head(hidden[torch.from_numpy(np.concatenate(rows)).to(model.device),
                                     torch.from_numpy(np.concatenate(positions)).to(model.device)])  # (N, V)
    return slots


def load_model(model_dir: Path, device: str = "cpu", dtype: str = "float32"):
    """The model as a trainer would load it, with empg's attention choice for the device and dtype (SDPA unless
    flash_attn is installed for a half-precision cuda run)."""
    from transformers import AutoModelForCausalLM

    from empg_cli.scoring import attention_implementation
    attn = attention_implementation(torch.device(device), getattr(torch, dtype))
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                attn_implementation=attn).to(device).eval()


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------

def scoring_comparison(case: str, rollouts: Rollouts, model_dir: Path, work: Path, *, speed_target: float | None,
                       floor_target: float | None, naive_repeats: int, chunk_check: bool = False,
                       device: str = "cpu", dtype: str = "float32",
                       accuracy_target: float | None = 1e-4) -> tuple[list[Row], dict[str, Any]]:
    """empg score_file vs the naive scorer and the forward floors on one rollouts file, every runner on the same
    device in the same dtype; shared by the scoring cases."""
    order = rollouts.order(["step", "group_id", "traj_id"])  # lock-step log order: all step-0 rows, then step 1...
    src = rollouts.write(work / f"{case}.parquet", order)
    dst = work / f"{case}.scored.parquet"
    warm_rows = np.flatnonzero(np.asarray(rollouts.columns["traj_id"]) == rollouts.columns["traj_id"][0])
    warm_src = rollouts.write(work / f"{case}.warm.parquet", warm_rows)
    prompts, responses = rollouts.rows(order)
    model = load_model(model_dir, device, dtype)
    tokens = rollouts.n_tokens
    empg = lambda dst, **options: run_empg(src, dst, model_dir, device, dtype, **options)  # noqa: E731

    print(f"  warm-up ({case})", flush=True)
    run_empg(warm_src, work / "warm.scored.parquet", model_dir, device, dtype)
    naive_step_entropies(model, prompts[:NAIVE_BATCH], responses[:NAIVE_BATCH], NAIVE_BATCH)
    floors = ("decoder", "decoder+head@responses", "model(input_ids)")
    runners: dict[str, Callable[[], Any]] = {
        "naive": lambda: naive_step_entropies(model, prompts, responses, NAIVE_BATCH),
        "empg": lambda: empg(dst)}
    runners.update({f"floor {m}": (lambda m=m: forward_floor(model, rollouts, m)) for m in floors})
    # A file bigger than score_file's read chunk, logged in lock-step order, splits every trajectory across
    # chunks; a small rows_per_chunk reproduces that here (skipped if score_file has no such option).
    split = 2 * len(rollouts.sequences) if "rows_per_chunk" in inspect.signature(score_file).parameters else None
    if split and chunk_check:
        runners["empg split"] = lambda: empg(work / f"{case}.split.parquet", rows_per_chunk=split)
    repeats = {name: naive_repeats if name == "naive" else 1 if name == "empg split" else REPEATS for name in runners}
    best = best_of(case, runners, repeats)

    naive_s, naive = best["naive"]
    empg_s, breakdown = best["empg"]
    scored = pq.read_table(dst)
    info = json.loads(scored.schema.metadata[b"empg"])["model"]
    max_diff = float(np.max(np.abs(scored.column("step_entropy").to_numpy() - naive.step_entropy)))
    per_s = lambda s: f"{tokens / s:,.0f} tok/s"  # noqa: E731 - trajectory tokens (what empg scores) per second
    rows = [Row(case, f"naive trainer-style scorer (micro-batch {NAIVE_BATCH}, full fp32 log_softmax)", naive_s,
                per_s(naive_s)),
            Row(case, "empg score_file (read, load model, score, advantages, write)", empg_s, per_s(empg_s),
                f"{naive_s / empg_s:.2f}x vs naive", f">= {speed_target:g}x" if speed_target else "",
                naive_s / empg_s >= speed_target if speed_target else None),
            Row(case, f"max |step entropy empg - naive| (nats, both {dtype})", None, "", f"{max_diff:.2e}",
                f"<= {accuracy_target:g}" if accuracy_target else "",
                max_diff <= accuracy_target if accuracy_target else None)]
    for m in floors:
        floor_s, slots = best[f"floor {m}"]
        target = floor_target if m == JUDGED_FLOOR else None
        rows.append(Row(case, f"floor: {m}", floor_s, per_s(floor_s), f"empg at {floor_s / empg_s:.2f}x of it",
                        f">= {target:g}x" if target else "", floor_s / empg_s >= target if target else None))
    if "empg split" in best:
        split_s = best["empg split"][0]
        rows.append(Row(case, f"  empg score_file, rows_per_chunk={split} (each read chunk holds 2 steps of every "
                              "trajectory)", split_s, per_s(split_s), f"{split_s / empg_s:.2f}x the time of empg"))
    decoder_s = best["floor decoder"][0]
    scoring_s = breakdown["tokens+plan+score_units"]
    rows.append(Row(case, "  of empg: tokens + plan + score_units (forward, head, entropies)", scoring_s,
                    per_s(scoring_s), f"at {decoder_s / scoring_s:.2f}x of decoder floor"))
    details = {"rows": len(prompts), "trajectories": len(rollouts.sequences), "tokens": tokens,
               "response_tokens": rollouts.n_response_tokens, "naive_tokens": naive.tokens,
               "naive_slots": naive.padded_tokens, "prefix_shared": info["prefix_shared_trajectories"],
               "breakdown": breakdown, "max_len": int(max(len(s) for s in rollouts.sequences)),
               "floors": {m: best[f"floor {m}"][0] for m in floors}}
    return rows, details


def case_multi_turn(work: Path, model_dir: Path, quick: bool) -> tuple[list[Row], dict[str, Any]]:
    """Multi-turn prefix-chained trajectories: the case the >= 5x and >= 0.9x targets are about."""
    rollouts = multi_turn(np.random.default_rng(1), SCORING_MODEL.vocab_size, trajectories=4 if quick else 12,
                          group_size=4, steps=(6, 10), first_prompt=(96, 192), response=(16, 64),
                          observation=(48, 128))
    rows, details = scoring_comparison("multi-turn", rollouts, model_dir, work, speed_target=5.0,
                                       floor_target=0.9, naive_repeats=1, chunk_check=True)
    assert details["prefix_shared"] == details["trajectories"], "empg did not score every trajectory as one chain"
    return rows, details


def case_grpo(work: Path, model_dir: Path, quick: bool) -> tuple[list[Row], dict[str, Any]]:
    """Single-turn GRPO groups: nothing to share, so only the response-only head and the packing help."""
    rollouts = single_turn_groups(np.random.default_rng(2), SCORING_MODEL.vocab_size, groups=1 if quick else 4,
                                  group_size=8, prompt=(64, 256), response=(32, 256))
    return scoring_comparison("grpo", rollouts, model_dir, work, speed_target=None, floor_target=None,
                              naive_repeats=1)


def case_memory(work: Path, model_dir: Path, weights_bytes: int, quick: bool) -> tuple[list[Row], dict[str, Any]]:
    """Peak RSS of score_file on one 16k-token, 8-step prefix-chained trajectory with a 152k vocabulary."""
    rollouts = memory_trajectory(MEMORY_MODEL.vocab_size, 2048 if quick else 16384)
    src = rollouts.write(work / "memory.parquet")
    out = subprocess.run([sys.executable, str(BENCH / "memory_child.py"), str(src), str(work / "memory.scored.parquet"),
                          str(model_dir), str(BATCH_TOKENS)], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    out = subprocess.run([sys.executable, str(BENCH / "memory_child.py"), "--load-only", str(model_dir)], check=True,
                         capture_output=True, text=True)
    load_peak = json.loads(out.stdout.strip().splitlines()[-1])["vm_hwm_mib"]
    peak, weights_mib = result["vm_hwm_mib"], weights_bytes / 2 ** 20
    limit = weights_mib + 1.5 * 1024
    naive_logits_gib = rollouts.n_tokens * MEMORY_MODEL.vocab_size * 4 / GIB
    rows = [Row("memory", f"empg score_file, 1 trajectory x {rollouts.n_tokens:,} tokens, fresh process: peak RSS",
                result["seconds"], f"{peak:,.0f} MiB",
                f"weights {weights_mib:,.0f} MiB + {peak - weights_mib:,.0f} MiB",
                f"<= weights + 1536 MiB ({limit:,.0f})", peak <= limit),
            Row("memory", "  same process right after imports (python, torch, transformers, polars, pyarrow)", None,
                f"{result['after_imports_mib']:,.0f} MiB"),
            Row("memory", "  a fresh process that only imports and loads the model (load_policy): peak RSS", None,
                f"{load_peak:,.0f} MiB"),
            Row("memory", "  naive / model(input_ids) on it: fp32 logits alone (computed, not run)", None,
                f"{naive_logits_gib:,.1f} GiB")]
    return rows, {"tokens": rollouts.n_tokens, "response_tokens": rollouts.n_response_tokens,
                  "load_peak_mib": load_peak, **result}


def case_advantages(quick: bool) -> tuple[list[Row], dict[str, Any]]:
    """advantage_table on 10M steps vs a per-row Python loop on a 200k-step subset (whole groups)."""
    iterations, groups = (2, 2_000) if quick else (10, 31_250)  # x 8 trajectories x 4 steps = 10M steps
    frame = advantage_frame(np.random.default_rng(4), iterations=iterations, groups=groups, group_size=8, steps=4)
    subset_groups = 500 if quick else 6_250                           # x 32 steps = 200k steps
    subset = frame.filter((pl.col("iteration") == 0) & (pl.col("group") < subset_groups)).drop("group")
    frame = frame.drop("group")
    cfg = AdvantageConfig()
    subset_dicts = subset.to_dicts()

    print("  warm-up (advantages)", flush=True)
    advantage_table(subset, cfg)
    best = best_of("advantages", {"library 10M": lambda: advantage_table(frame, cfg),
                    "library subset": lambda: advantage_table(subset, cfg),
                    "loop subset": lambda: loop_advantages(subset_dicts)},
                   {"library 10M": REPEATS, "library subset": REPEATS, "loop subset": 1 if not quick else 2})
    lib_s, loop_s, sub_s = best["library 10M"][0], best["loop subset"][0], best["library subset"][0]
    library, looped = best["library subset"][1], best["loop subset"][1]
    max_diff = max(float(np.max(np.abs(library[c].to_numpy() - np.asarray(looped[c])))) for c in ADVANTAGE_COLUMNS)
    n, m = frame.height, subset.height
    lib_rate, loop_rate = n / lib_s, m / loop_s
    rows = [Row("advantages", f"advantage_table, {n:,} steps (polars, {THREADS} threads)", lib_s,
                f"{lib_rate:,.0f} steps/s", "", "<= 10 s", lib_s <= 10.0),
            Row("advantages", f"per-row Python loop, {m:,}-step subset", loop_s, f"{loop_rate:,.0f} steps/s"),
            Row("advantages", "library steps/s vs loop steps/s", None, "", f"{lib_rate / loop_rate:,.0f}x", ">= 100x",
                lib_rate / loop_rate >= 100),
            Row("advantages", f"  advantage_table on the same {m:,}-step subset", sub_s,
                f"{m / sub_s:,.0f} steps/s"),
            Row("advantages", "max |library - loop| over the 9 advantage columns (subset)", None, "",
                f"{max_diff:.2e}", "<= 1e-9", max_diff <= 1e-9)]
    return rows, {"steps": n, "subset": m, "iterations": iterations, "groups": groups}


def case_gpu(work: Path, quick: bool) -> tuple[list[Row], dict[str, Any]]:
    """The cuda path with a model of Qwen2.5-0.5B's shape (152k vocabulary): multi-turn speed in bfloat16 against
    the naive scorer and the forward floors on the same GPU, float32 agreement with the naive scorer, and peak GPU
    memory on one 16k-token trajectory."""
    model_dir = work / GPU_MODEL.name
    model_dir.mkdir()
    counts = build_model(GPU_MODEL, model_dir, device="cuda", dtype=torch.bfloat16)
    rollouts = multi_turn(np.random.default_rng(5), GPU_MODEL.vocab_size, trajectories=16 if quick else 64,
                          group_size=8, steps=(6, 10), first_prompt=(256, 512), response=(32, 128),
                          observation=(64, 256))
    case = "gpu-multi-turn"
    rows, details = scoring_comparison(case, rollouts, model_dir, work, speed_target=5.0, floor_target=0.9,
                                       naive_repeats=REPEATS, device="cuda", dtype="bfloat16", accuracy_target=None)
    src, tokens = work / f"{case}.parquet", rollouts.n_tokens
    big = 4 * BATCH_TOKENS
    big_s = best_of(case, {f"empg --batch-tokens {big}": lambda: run_empg(
        src, work / "gpu-big.scored.parquet", model_dir, "cuda", "bfloat16", batch_tokens=big)},
        {f"empg --batch-tokens {big}": REPEATS})[f"empg --batch-tokens {big}"][0]
    empg_s = next(r.seconds for r in rows if r.what.startswith("empg score_file"))
    rows.append(Row(case, f"  empg score_file, --batch-tokens {big}", big_s, f"{tokens / big_s:,.0f} tok/s",
                    f"{empg_s / big_s:.2f}x the default's speed"))
    rows += gpu_float32_agreement(work, model_dir)
    memory_rows, details["memory"] = gpu_memory(work, model_dir, counts["weights_bytes"], quick)
    return rows + memory_rows + gpu_engines(work, model_dir, quick), {**details, "counts": counts}


def gpu_engines(work: Path, model_dir: Path, quick: bool) -> list[Row]:
    """`--engine ray` with one worker per GPU of this machine against the local engine on one GPU, end to end on a
    larger multi-turn case (Ray's actor start-up and per-worker model load are inside the timed runs)."""
    try:
        import ray
    except ImportError:  # the optional extra: a GPU machine without it still gets every other row
        return [Row("gpu-engines", "empg score --engine ray: not measured, ray is not installed here")]

    from engines import measure
    gpus = torch.cuda.device_count()
    rollouts = multi_turn(np.random.default_rng(9), GPU_MODEL.vocab_size, trajectories=64 if quick else 1024,
                          group_size=8, steps=(6, 10), first_prompt=(256, 512), response=(32, 128),
                          observation=(64, 256))
    src, tokens = rollouts.write(work / "gpu-engines.parquet"), rollouts.n_tokens
    ray.init(include_dashboard=False, log_to_driver=False)  # a local cluster holding every GPU of the machine
    try:
        best = measure(model_dir, {"local": [(src, {})], "ray": [(src, {"engine": "ray"})]}, device="cuda",
                       repeats=REPEATS)
    finally:
        ray.shutdown()
    speedup = best["local"] / best["ray"]
    case = f"gpu-engines ({tokens:,} tokens)"
    return [Row(case, "empg score --engine local (one GPU)", best["local"],
                f"{tokens / best['local']:,.0f} tok/s"),
            Row(case, f"empg score --engine ray ({gpus} workers, one per GPU)", best["ray"],
                f"{tokens / best['ray']:,.0f} tok/s", f"{speedup:.2f}x local",
                f">= {0.85 * gpus:.2f}x" if gpus > 1 else "", speedup >= 0.85 * gpus if gpus > 1 else None)]


def gpu_float32_agreement(work: Path, model_dir: Path) -> list[Row]:
    """8 multi-turn trajectories scored on cuda by empg and by the naive scorer, both in float32 (the 1e-4 target),
    and by empg in bfloat16 (how far the default GPU dtype is from float32)."""
    rollouts = multi_turn(np.random.default_rng(6), GPU_MODEL.vocab_size, trajectories=8, group_size=8,
                          steps=(6, 10), first_prompt=(256, 512), response=(32, 128), observation=(64, 256))
    src = rollouts.write(work / "gpu-float32.parquet")
    naive = naive_step_entropies(load_model(model_dir, "cuda", "float32"), *rollouts.rows(np.arange(
        len(rollouts.columns["run"]))), NAIVE_BATCH).step_entropy
    rows = []
    for dtype, target in (("float32", 1e-4), ("bfloat16", None)):
        dst = work / f"gpu-{dtype}.scored.parquet"
        run_empg(src, dst, model_dir, "cuda", dtype)
        diff = float(np.max(np.abs(pq.read_table(dst).column("step_entropy").to_numpy() - naive)))
        rows.append(Row("gpu-multi-turn", f"max |step entropy empg cuda {dtype} - naive cuda float32| (nats), "
                                          f"{len(naive)} steps", None, "", f"{diff:.2e}",
                        f"<= {target:g}" if target else "", diff <= target if target else None))
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def memory_trajectory(vocab: int, total: int, steps: int = 8) -> Rollouts:
    """One prefix-chained trajectory of `total` tokens, `steps` steps, responses of total / 64 tokens."""
    response = total // 64
    observation = (total - total // 16 - steps * response) // (steps - 1)
    first = total - steps * response - (steps - 1) * observation
    return multi_turn(np.random.default_rng(3), vocab, trajectories=1, group_size=1, steps=(steps, steps),
                      first_prompt=(first, first), response=(response, response),
                      observation=(observation, observation))


def gpu_memory(work: Path, model_dir: Path, weights_bytes: int, quick: bool) -> tuple[list[Row], dict[str, Any]]:
    """Peak GPU memory of score_file (bfloat16) on one 16k-token trajectory: weights + what scoring adds."""
    rollouts = memory_trajectory(GPU_MODEL.vocab_size, 2048 if quick else 16384)
    src = rollouts.write(work / "gpu-memory.parquet")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    run_empg(src, work / "gpu-memory.scored.parquet", model_dir, "cuda", "bfloat16")
    seconds = time.perf_counter() - started
    peak_mib, weights_mib = (torch.cuda.max_memory_allocated() - before) / 2 ** 20, weights_bytes / 2 ** 20
    limit = weights_mib + 1536
    logits_gib = rollouts.n_tokens * GPU_MODEL.vocab_size * 4 / GIB
    rows = [Row("gpu-memory", f"empg score_file, 1 trajectory x {rollouts.n_tokens:,} tokens, bfloat16: peak "
                              "torch.cuda.max_memory_allocated", seconds, f"{peak_mib:,.0f} MiB",
                f"weights {weights_mib:,.0f} MiB + {peak_mib - weights_mib:,.0f} MiB",
                f"<= weights + 1536 MiB ({limit:,.0f})", peak_mib <= limit),
            Row("gpu-memory", "  naive / model(input_ids) on it: fp32 logits alone (computed, not run)", None,
                f"{logits_gib:,.1f} GiB")]
    return rows, {"tokens": rollouts.n_tokens, "peak_mib": peak_mib}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def machine() -> dict[str, str]:
    import transformers
    cpuinfo = Path("/proc/cpuinfo").read_text()
    field = lambda name: next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()  # noqa: E731
                               if line.startswith(name)), "?")
    cpu = f"{field('model name')} (family {field('cpu family')}, model {field('model')}, cache {field('cache size')})"
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem = next(line.split()[1] for line in meminfo if line.startswith("MemTotal"))
    git = lambda *a: subprocess.run(["git", "-C", str(BENCH.parent), *a], capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") + (" + uncommitted changes in empg_cli"
                                                    if git("status", "--porcelain", "empg_cli") else "")
    return {"cpu": cpu, "cores": f"{len(os.sched_getaffinity(0))} usable ({os.cpu_count()} online), "
                                 f"torch threads {torch.get_num_threads()}",
            "memory": f"{int(mem) / 2 ** 20:.1f} GiB", "python": platform.python_version(),
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, polars {pl.__version__}",
            "empg commit": commit, "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def table(rows: list[Row]) -> str:
    header = ["case", "what", "seconds", "throughput / value", "ratio", "target", "result"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def extra_scoring(details: dict[str, Any]) -> float:
    """Seconds empg's scoring part takes beyond the decoder+head@responses floor."""
    return details["breakdown"]["tokens+plan+score_units"] - details["floors"]["decoder+head@responses"]


def report(rows: list[Row], info: dict[str, str], details: dict[str, Any], counts: dict[str, dict[str, float]],
           elapsed: float) -> str:
    mt, grpo, mem, adv = details["multi-turn"], details["grpo"], details["memory"], details["advantages"]
    sc, mc = counts[SCORING_MODEL.name], counts[MEMORY_MODEL.name]
    head_vs_decoder = sc["lm_head"] / sc["decoder_layers"]
    head_share = mt["response_tokens"] * sc["lm_head"] / (mt["tokens"] * sc["decoder_layers"])
    verdicts = [r for r in rows if r.ok is not None]
    lines = [
        "# empg benchmark results",
        "",
        f"Written by `bench/run.py` on {datetime.now(timezone.utc).isoformat(timespec='seconds')}; the whole run took "
        f"{elapsed / 60:.1f} min. {sum(r.ok for r in verdicts)} of {len(verdicts)} checks pass.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "The machine is shared with other work, so absolute seconds carry noise; runners of a case are interleaved "
        f"(round robin, best of {REPEATS} after one warm-up; the naive scorer, and any runner whose first run takes "
        f"{LONG_RUN_S:.0f} s or more, once) so that load hits them alike.",
        "",
        "## Models and cases",
        "",
        f"- `{SCORING_MODEL.name}` (multi-turn, grpo): {SCORING_MODEL.describe()}; decoder layers "
        f"{sc['decoder_layers'] / 1e6:.1f}M parameters, embedding {sc['embedding'] / 1e6:.1f}M, LM head "
        f"{sc['lm_head'] / 1e6:.1f}M; weights {sc['weights_bytes'] / 2 ** 20:.0f} MiB. float32, SDPA attention.",
        f"- `{MEMORY_MODEL.name}` (memory): {MEMORY_MODEL.describe()}; weights "
        f"{mc['weights_bytes'] / 2 ** 20:.0f} MiB.",
        f"- multi-turn: {mt['trajectories']} prefix-chained trajectories of 6-10 steps (prompt_t+1 = prompt_t + "
        f"response_t + observation), {mt['rows']} rows; empg scores {mt['tokens']:,} tokens (longest "
        f"{mt['max_len']:,}), {mt['response_tokens']:,} of them response tokens "
        f"({mt['response_tokens'] / mt['tokens']:.0%}); the naive scorer pushes {mt['naive_tokens']:,} tokens "
        f"({mt['naive_tokens'] / mt['tokens']:.1f}x) in {mt['naive_slots']:,} padded slots. empg scored "
        f"{mt['prefix_shared']} of {mt['trajectories']} trajectories as one sequence.",
        f"- grpo: {grpo['trajectories']} single-step rows in groups of 8 sharing a prompt; {grpo['tokens']:,} tokens, "
        f"{grpo['response_tokens']:,} response tokens ({grpo['response_tokens'] / grpo['tokens']:.0%}); naive "
        f"{grpo['naive_slots']:,} padded slots.",
        f"- memory: 1 trajectory, 8 steps, {mem['tokens']:,} tokens, {mem['response_tokens']:,} response tokens.",
        f"- advantages: {adv['steps']:,} steps = {adv['iterations']} iterations x {adv['groups']:,} groups x 8 "
        f"trajectories x 4 steps, rows in lock-step log order (iteration, step, group, trajectory); loop subset "
        f"{adv['subset']:,} steps (whole groups of iteration 0). Loop time excludes `to_dicts()`.",
        "",
        "## Results",
        "",
        table(rows),
        "",
        "Throughput of the scoring cases is the case's trajectory tokens (the tokens empg scores) per second for every "
        "runner, so the ratios are ratios of wall time. empg is timed end to end through "
        "`empg_cli.pipeline.score_file` "
        "(read and validate Parquet, load the model from disk, tokens, prefix-chain planning, scoring, per-step "
        "statistics, advantages, atomic Parquet write); the floors time only forward passes on a model already in "
        "memory, over the same sequences in empg's own batches (`token_budget_batches`, "
        f"{BATCH_TOKENS} tokens, right-padded):",
        "",
        "- `model(input_ids)`: the full Hugging Face forward with float32 logits at every position: the issue's "
        "\"bare `model(input_ids)` forward over the same tokens\", which the 0.9x target is judged against.",
        "- `decoder+head@responses`: `model.model(...)` plus `lm_head` at the positions that predict response "
        "tokens, no softmax: the least work that yields the response logits (stricter, reported).",
        "- `decoder`: `model.model(input_ids, attention_mask)` to the last hidden state, no LM head at all "
        "(stricter still, reported: no exact scorer can reach it, see the note on the head below).",
        "",
        "empg's time split (best multi-turn run): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in mt["breakdown"].items()) + "; grpo: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in grpo["breakdown"].items()) + ". "
        + " ".join(f"In {name}, empg's scoring part takes {extra_scoring(d):.2f} s more than the "
                   "decoder+head@responses floor: the softmax reductions of the response logits (entropy, sum p^2, "
                   "log-prob) plus batching and tokens." for name, d in (("multi-turn", mt), ("grpo", grpo))),
        "",
        f"Memory case: a fresh process peaks at {mem['after_imports_mib']:,.0f} MiB after its imports and at "
        f"{mem['load_peak_mib']:,.0f} MiB when it only loads the model; score_file peaks at "
        f"{mem['vm_hwm_mib']:,.0f} MiB.",
        "",
        f"In this toy model the LM head has {head_vs_decoder:.1f}x the parameters of all decoder layers together "
        f"(vocab 32k at hidden {SCORING_MODEL.hidden_size}); in Qwen2.5-1.5B it is about 0.18x and in Qwen2.5-7B about "
        "0.08x. The head at response positions, which any exact scorer must compute, therefore weighs far more "
        "against the decoder-only floor here than it would with a real checkpoint: in the multi-turn case its matmul "
        f"is {head_share:.0%} of the decoder's weight matmuls (response tokens x head parameters over tokens x "
        f"decoder-layer parameters), so even a scorer with no overhead at all would run at about "
        f"{1 / (1 + head_share):.2f}x of the decoder-only floor (attention not counted).",
        "",
        "All timed runs (seconds, in order): "
        + "; ".join(f"{k} " + ", ".join(f"{x:.2f}" for x in v) for k, v in ALL_RUNS.items()) + ".",
        "",
        "## Unmeasured here",
        "",
        "- The GPU path (cuda, bfloat16, FlashAttention-2 when installed): "
        + ("see RESULTS_GPU.md" if (BENCH / "RESULTS_GPU.md").exists() else
           "not measured yet, as no GPU has been available to this project; `bench/run.py --gpu` (`make bench-gpu`) "
           "measures it on a CUDA machine and writes bench/RESULTS_GPU.md")
        + ". This run covers the CPU, float32 + SDPA.",
        "- Real checkpoints (1.5B-32B parameters) and their hidden sizes: the models here are random and small so that "
        "the whole run fits in about 10 minutes on 2 cores.",
        f"- The naive scorer and a full `model(input_ids)` on the 16k-token, 152k-vocab trajectory: float32 logits "
        f"alone would take {mem['tokens'] * MEMORY_MODEL.vocab_size * 4 / GIB:.1f} GiB (and log_softmax as much "
        "again), more than this shared machine can give.",
        "",
    ]
    return "\n".join(lines)


def gpu_report(rows: list[Row], info: dict[str, str], details: dict[str, Any], elapsed: float) -> str:
    """RESULTS_GPU.md: the cuda cases of `bench/run.py --gpu`."""
    g, counts = details["gpu"], details["gpu"]["counts"]
    verdicts = [r for r in rows if r.ok is not None]
    lines = [
        "# empg benchmark results: the GPU path",
        "",
        f"Written by `bench/run.py --gpu` on {datetime.now(timezone.utc).isoformat(timespec='seconds')}; the whole run "
        f"took {elapsed / 60:.1f} min. {sum(r.ok for r in verdicts)} of {len(verdicts)} checks pass. The CPU results "
        "are in RESULTS.md.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## Model and cases",
        "",
        f"- `{GPU_MODEL.name}`: {GPU_MODEL.describe()} (the shapes of Qwen2.5-0.5B, random weights); decoder layers "
        f"{counts['decoder_layers'] / 1e6:.0f}M parameters, embedding {counts['embedding'] / 1e6:.0f}M, LM head "
        f"{counts['lm_head'] / 1e6:.0f}M; bfloat16 weights {counts['weights_bytes'] / 2 ** 20:,.0f} MiB.",
        f"- gpu-multi-turn: {g['trajectories']} prefix-chained trajectories of 6-10 steps, {g['rows']} rows; empg "
        f"scores {g['tokens']:,} tokens (longest {g['max_len']:,}), {g['response_tokens']:,} of them response tokens; "
        f"the naive scorer pushes {g['naive_tokens']:,} tokens ({g['naive_tokens'] / g['tokens']:.1f}x) in "
        f"{g['naive_slots']:,} padded slots. Every runner runs on the GPU in bfloat16 with "
        f"{info['attention']} attention; the naive scorer casts the logits to float32 before its log_softmax.",
        "- float32 agreement: 8 more trajectories scored on the GPU in float32 by empg and by the naive scorer.",
        f"- gpu-memory: 1 trajectory, 8 steps, {g['memory']['tokens']:,} tokens, bfloat16.",
        "",
        "## Results",
        "",
        table(rows),
        "",
        "Throughput is trajectory tokens (the tokens empg scores) per second for every runner. empg is timed end to "
        "end through `score_file` (read, load the model from disk to the GPU, score, advantages, write); the floors "
        "time forward passes on a model already on the GPU, over the same sequences in empg's batches "
        f"({BATCH_TOKENS} tokens): `model(input_ids)` returns bfloat16 logits at every position. Timed runs end with "
        "`torch.cuda.synchronize()`.",
        "",
        "empg's time split (best run): " + ", ".join(f"{k} {v:.2f} s" for k, v in g["breakdown"].items()) + ".",
        "",
        "All timed runs (seconds, in order): "
        + "; ".join(f"{k} " + ", ".join(f"{x:.2f}" for x in v) for k, v in ALL_RUNS.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; the report goes to the temp dir, not RESULTS.md")
    parser.add_argument("--gpu", action="store_true", help="the cuda cases only (needs a GPU): RESULTS_GPU.md")
    args = parser.parse_args()
    if not args.gpu:  # the CPU cases run on this machine's 2 cores; on a GPU machine torch keeps its default
        torch.set_num_threads(THREADS)
    started = time.perf_counter()
    info = machine()
    rows: list[Row] = []
    details: dict[str, Any] = {}
    name = "RESULTS_GPU.md" if args.gpu else "RESULTS.md"
    target = Path(tempfile.gettempdir()) / f"empg-bench-{name}" if args.quick else BENCH / name
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("bench/run.py --gpu needs a CUDA device")
        from empg_cli.scoring import attention_implementation
        info["gpu"] = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
        info["attention"] = attention_implementation(torch.device("cuda"), torch.bfloat16)
        with tempfile.TemporaryDirectory(prefix="empg-bench-") as tmp:
            print("case gpu", flush=True)
            rows, details["gpu"] = case_gpu(Path(tmp), args.quick)
        elapsed = time.perf_counter() - started
        print(table(rows))
        target.write_text(gpu_report(rows, info, details, elapsed))
        print(f"\nbench took {elapsed / 60:.1f} min; wrote {target}")
        return
    with tempfile.TemporaryDirectory(prefix="empg-bench-") as tmp:
        work = Path(tmp)
        counts = {}
        for spec in (SCORING_MODEL, MEMORY_MODEL):
            print(f"building {spec.name}: {spec.describe()}", flush=True)
            (work / spec.name).mkdir()
            counts[spec.name] = build_model(spec, work / spec.name)
            gc.collect()
        for name, case in (("multi-turn", lambda: case_multi_turn(work, work / SCORING_MODEL.name, args.quick)),
                           ("grpo", lambda: case_grpo(work, work / SCORING_MODEL.name, args.quick)),
                           ("memory", lambda: case_memory(work, work / MEMORY_MODEL.name,
                                                          counts[MEMORY_MODEL.name]["weights_bytes"], args.quick)),
                           ("advantages", lambda: case_advantages(args.quick))):
            print(f"case {name}", flush=True)
            case_rows, details[name] = case()
            rows += case_rows
            gc.collect()
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    elapsed = time.perf_counter() - started
    print()
    print(table(rows))
    print(f"\nbench took {elapsed / 60:.1f} min")
    target.write_text(report(rows, info, details, counts, elapsed)
                      + "".join(kept_section(target, name) for name in ("verl", "convert", "convert-notes", "engines")))
    print(f"wrote {target}")


def kept_section(path: Path, name: str) -> str:
    """A section another script wrote into RESULTS.md between `<!-- name:start -->` and `<!-- name:end -->`
    (`verl`: `make bench-verl`, bench/verl_grpo.py; `convert`: bench/convert.py, and `convert-notes`, how its
    figures were reached; `engines`: bench/engines.py), kept as it is: this run does not measure it."""
    text = path.read_text() if path.exists() else ""
    start, end = text.find(f"<!-- {name}:start -->"), text.find(f"<!-- {name}:end -->")
    return "\n" + text[start:end + len(f"<!-- {name}:end -->")] + "\n" if 0 <= start < end else ""


if __name__ == "__main__":
    main()
