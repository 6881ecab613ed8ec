"""Size and speed of `empg report`: the sample scored with --token-level, and a synthetic 100k-step file.

    .venv/bin/python bench/report.py          # writes bench/RESULTS_REPORT.md (a few minutes on 2 cores)

For each file: seconds to build the page, its size, and in headless chromium (Debian's, through Playwright) the
time from navigation to the first render, to filter the step list to one audit quadrant, and to open the longest
trajectory. The synthetic file has token ids of a word-level tokenizer and one entropy per token, like a
--token-level file, so its page colours every token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from data import build_tokenizer  # noqa: E402

import empg_cli as empg  # noqa: E402
from empg_cli.config import AdvantageConfig, ScoreConfig, config_to_dict  # noqa: E402
from empg_cli.pipeline import score_file  # noqa: E402
from empg_cli.report import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def synthetic(path: Path, steps: int, seed: int = 0) -> Path:
    """`steps` scored steps: 10 iterations x groups of 4 trajectories x 5 steps, 4-24 tokens per response."""
    rng = np.random.default_rng(seed)
    n_traj = steps // 5
    traj = np.repeat(np.arange(n_traj), 5)
    lengths = rng.integers(4, 25, size=steps)
    ids = [rng.integers(3, 64, size=n).tolist() for n in lengths]
    entropy = [rng.gamma(1.0, 0.3, size=n).astype(np.float32).tolist() for n in lengths]
    frame = pl.DataFrame({
        "run": "synthetic", "iteration": (traj // (n_traj // 10)).astype(np.int64), "group_id": (traj // 4).astype(str),
        "traj_id": (traj % 4).astype(str), "step": np.tile(np.arange(5), n_traj),
        "reward": np.repeat(rng.integers(0, 2, size=n_traj).astype(float), 5),
        "response_ids": ids, "token_entropy": entropy, "step_entropy": [float(np.mean(e)) for e in entropy]})
    model = {"step_renyi2": frame["step_entropy"] * 0.7, "step_logprob": -frame["step_entropy"],
             "step_grad_norm_sq": 1 - np.exp(-frame["step_entropy"] * 0.7), "step_grad_norm_sq_expected":
             1 - np.exp(-frame["step_entropy"] * 0.7)}
    frame = frame.with_columns(n_response_tokens=pl.Series(lengths, dtype=pl.Int32), **model)
    scored = empg.compute_advantages(frame)
    build_tokenizer(path.parent / "tokenizer")
    table = scored.to_arrow().cast(scored.to_arrow().schema.set(
        scored.columns.index("response_ids"), pa.field("response_ids", pa.list_(pa.int32()))))
    metadata = {"model": {"ref": "tokenizer"}, "advantages": config_to_dict(AdvantageConfig())}
    pq.write_table(table.replace_schema_metadata({b"empg": json.dumps(metadata).encode()}), path)
    return path


def in_browser(report: Path) -> dict[str, float]:
    """Milliseconds to first render, to filter to a quadrant and to open the longest trajectory."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        start = time.perf_counter()
        page.goto(report.resolve().as_uri())
        page.wait_for_selector("body[data-ready=true]", timeout=120_000)
        ready = time.perf_counter() - start
        start = time.perf_counter()
        page.select_option("#f-quadrant", "1")
        page.wait_for_selector("#steps tbody tr")
        filtered = time.perf_counter() - start
        longest = page.evaluate("(() => { const d = JSON.parse(document.getElementById('report-data').textContent);"
                                " const l = d.trajectories.length; return l.indexOf(Math.max(...l)); })()")
        start = time.perf_counter()
        page.evaluate(f"location.hash = 'traj={longest}'")
        page.wait_for_selector("#trajectory-steps tbody tr")
        opened = time.perf_counter() - start
        browser.close()
    if errors:
        raise RuntimeError(f"script errors in {report}: {errors}")
    return {"ready_ms": 1000 * ready, "filter_ms": 1000 * filtered, "open_ms": 1000 * opened}


def measure(name: str, scored: Path, out: Path) -> dict:
    tokens = pq.read_table(scored, columns=["n_response_tokens"]).column(0)
    steps, tokens = len(tokens), sum(tokens.to_pylist())
    start = time.perf_counter()
    write_report(scored, out, overwrite=True)
    build = time.perf_counter() - start
    return {"case": name, "steps": steps, "tokens": tokens, "build_s": build, "size_mb": out.stat().st_size / 1e6,
            **in_browser(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS_REPORT.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sample = tmp / "sample.scored.parquet"
        score_file(ROOT / "sample_data" / "rollouts.parquet", sample, ScoreConfig(token_level=True, device="cpu"),
                   AdvantageConfig())
        rows = [measure("sample, --token-level", sample, tmp / "sample.html"),
                measure(f"synthetic, {args.steps:,} steps", synthetic(tmp / "synthetic.parquet", args.steps),
                        tmp / "synthetic.html")]
    lines = ["# empg report: size and time to render", "",
             f"Written by `bench/report.py` on {datetime.now(timezone.utc).isoformat(timespec='seconds')} "
             f"on {os.cpu_count()} shared CPU cores (load average {os.getloadavg()[0]:.1f} at the end); chromium "
             "headless through Playwright, times include its IPC. Rerun: `.venv/bin/python bench/report.py`.", "",
             "| file | steps | response tokens | build (s) | size (MB) | first render (ms) | "
             "filter to a quadrant (ms) | open the longest trajectory (ms) |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['steps']:,} | {r['tokens']:,} | {r['build_s']:.1f} | {r['size_mb']:.1f} | "
              f"{r['ready_ms']:.0f} | "
              f"{r['filter_ms']:.0f} | {r['open_ms']:.0f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
