"""Regenerate empg's sample workload deterministically from a seed (docs/sample_data.md).

    noisy expert demonstrations -> byte-level BPE tokenizer -> behaviour-cloned Llama policy
    -> RL iterations, each: sample groups, `empg score`, policy-gradient step on adv_empg
    -> OUT/rollouts.parquet (all iterations) + OUT/checkpoints/iter_<i>/ + OUT/README.md

Usage (from the repository root, with the project's virtual environment):

    HF_HUB_OFFLINE=1 .venv/bin/python examples/make_sample.py --seed 0 --out sample_data
    HF_HUB_OFFLINE=1 .venv/bin/python examples/make_sample.py --tiny --out /tmp/tiny   # what the tests run

Every random choice flows from --seed (numpy SeedSequence, torch.manual_seed, one torch.Generator
for token sampling) and torch runs on one thread, so two runs write identical files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, when run as a script

from household import Task, expert_episode  # noqa: E402
from policy import Turns, behaviour_clone, make_model, render, train_tokenizer  # noqa: E402
from trainer import RLConfig, train  # noqa: E402

CHECKPOINT_TEMPLATE = "checkpoints/iter_{iteration}"
"""Where iteration i's policy lives, relative to rollouts.parquet: the `empg` metadata's model reference."""


@dataclass(frozen=True)
class SampleConfig:
    """Everything that shapes the sample; stored whole in the Parquet file's `empg_sample` metadata."""

    seed: int = 0
    """Root of every random choice."""
    demos: int = 4000
    """Expert demonstrations for the tokenizer and behaviour cloning."""
    slip: float = 0.05
    """Probability that the expert goes to a random receptacle instead of acting well."""
    vocab_size: int = 512
    """Upper bound of the BPE vocabulary (training stops early when no pair is left to merge)."""
    hidden: int = 64
    """Width of the Llama policy."""
    layers: int = 2
    """Transformer blocks of the policy."""
    max_len: int = 1024
    """Context length (max_position_embeddings); the longest episode stays well below it."""
    bc_steps: int = 1000
    """Behaviour-cloning gradient steps."""
    bc_batch: int = 16
    """Demonstrations per behaviour-cloning step."""
    bc_lr: float = 5e-3
    """Peak AdamW learning rate of behaviour cloning."""
    rl: RLConfig = field(default_factory=RLConfig)
    """The reference trainer's settings."""


TINY = SampleConfig(demos=64, bc_steps=8, rl=RLConfig(iterations=2, groups=2, group_size=2, max_new_tokens=12))
"""Seconds instead of minutes: every stage runs, the policy stays close to untrained."""


def attach_metadata(table: pa.Table, cfg: SampleConfig, summaries: list[dict[str, float]]) -> pa.Table:
    """`empg` names the checkpoint template so that `empg score rollouts.parquet` needs no flags."""
    empg = {"model": {"ref": CHECKPOINT_TEMPLATE}, "temperature": 1.0}
    sample = {"config": asdict(cfg), "iterations": summaries}
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"empg": json.dumps(empg).encode(),
                                          b"empg_sample": json.dumps(sample).encode()})


def readme(cfg: SampleConfig, summaries: list[dict[str, float]], rows: int) -> str:
    """A short sample_data/README.md; the long story is docs/sample_data.md."""
    curve = "\n".join(f"| {i} | {s['success_rate']:.1%} | {s['mean_step_entropy']:.3f} | {s['mean_steps']:.1f} |"
                      for i, s in enumerate(summaries))
    return f"""# empg sample workload

Rollouts of a tiny Llama policy (hidden {cfg.hidden}, {cfg.layers} layers) in a text household task
(`examples/household.py`), {cfg.rl.iterations} RL iterations x {cfg.rl.groups} tasks x {cfg.rl.group_size} trajectories,
{rows} step rows, made by `examples/make_sample.py --seed {cfg.seed}`. Iteration i was sampled by
`checkpoints/iter_i`; the file's `empg` metadata names that template, so `empg score rollouts.parquet`
needs no flags. The policy was updated on `{cfg.rl.advantage}` from `empg score`. See docs/sample_data.md.

| iteration | success rate | mean step entropy (nats) | mean steps |
|---|---|---|---|
{curve}

Regenerate (deterministic, about 6 minutes on 2 CPU cores):

    HF_HUB_OFFLINE=1 .venv/bin/python examples/make_sample.py --seed {cfg.seed} --out sample_data
"""


def make_sample(cfg: SampleConfig, out: Path, log=print) -> list[dict[str, float]]:
    """Build everything into `out` (its rollouts.parquet and checkpoints/ are replaced)."""
    started = time.perf_counter()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    demo_seeds, model_seed, bc_seed, rl_seed = np.random.SeedSequence(cfg.seed).spawn(4)
    demo_rng = np.random.default_rng(demo_seeds)
    # demonstration tasks come from seeds >= 100000; the RL tasks are drawn below 100000
    demos = [expert_episode(Task.from_seed(100_000 + i), demo_rng, cfg.slip)[0] for i in range(cfg.demos)]
    tokenizer = train_tokenizer([render(m) for m in demos], cfg.vocab_size)
    turns = Turns(tokenizer)
    model = make_model(len(tokenizer), hidden=cfg.hidden, layers=cfg.layers, max_len=cfg.max_len,
                       seed=int(model_seed.generate_state(1)[0]))
    losses = behaviour_clone(model, [turns.demonstration(m) for m in demos], steps=cfg.bc_steps,
                             batch_size=cfg.bc_batch, lr=cfg.bc_lr, pad_id=turns.pad_id,
                             seed=int(bc_seed.generate_state(1)[0]))
    log(f"behaviour cloning: {cfg.bc_steps} steps, final loss {np.mean(losses[-20:]):.3f} "
        f"({time.perf_counter() - started:.0f} s)")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        tables, summaries = train(model, tokenizer, cfg.rl, rl_seed, out / "checkpoints", Path(work), log)
    table = attach_metadata(pa.concat_tables(tables), cfg, summaries)
    pq.write_table(table, out / "rollouts.parquet", compression="zstd", compression_level=9)
    (out / "README.md").write_text(readme(cfg, summaries, table.num_rows))
    log(f"wrote {out / 'rollouts.parquet'} ({table.num_rows} rows) in {time.perf_counter() - started:.0f} s")
    return summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="root of every random choice (default 0)")
    parser.add_argument("--out", type=Path, default=Path("sample_data"), help="output folder (default sample_data)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long version of every stage, for tests")
    args = parser.parse_args()
    make_sample(replace(TINY if args.tiny else SampleConfig(), seed=args.seed), args.out)


if __name__ == "__main__":
    main()
