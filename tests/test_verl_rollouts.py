"""examples/verl_rollouts.py: a verl-layout batch (left-padded prompts, right-padded responses, uids) becomes
rollouts whose rescored entropies equal the sampler's own logits."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import polars as pl
import torch

from empg_cli.cli import main

_spec = importlib.util.spec_from_file_location(
    "verl_rollouts", Path(__file__).resolve().parents[1] / "examples" / "verl_rollouts.py")
verl_rollouts = importlib.util.module_from_spec(_spec)  # by path: examples/ stays off sys.path
_spec.loader.exec_module(verl_rollouts)

PAD = 0


def entropy(logits: torch.Tensor, temperature: float) -> float:
    """Shannon entropy (nats) of softmax(logits / T), float64."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return float(-(logp.exp() * logp).sum())


def test_a_verl_batch_rescored_from_its_ids_matches_the_samplers_logits(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    questions = [rng.integers(5, 300, size=n).tolist() for n in (9, 5)]
    samples, temperature = 3, 0.8
    width = max(map(len, questions))
    # verl repeats each prompt n times, interleaved, and left-pads the prompts
    prompts = torch.tensor([[PAD] * (width - len(q)) + q for q in questions for _ in range(samples)])
    prompt_mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in questions for _ in range(samples)])
    torch.manual_seed(0)
    out = model.generate(prompts, attention_mask=prompt_mask, do_sample=True, temperature=temperature, top_k=0,
                         top_p=1.0, min_new_tokens=8, max_new_tokens=8, pad_token_id=PAD, output_logits=True,
                         return_dict_in_generate=True)
    # responses of several lengths, right-padded (as if each had stopped at its own EOS; causality makes the
    # logits of the kept tokens the same as if generation had stopped there)
    lengths = torch.tensor([8, 3, 5, 8, 1, 6])
    response_mask = (torch.arange(8) < lengths[:, None]).long()
    responses = torch.where(response_mask.bool(), out.sequences[:, width:], PAD)  # (B, R)
    uids = ["q0"] * samples + ["q1"] * samples
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    path = verl_rollouts.write_verl_batch(tmp_path / "step_3.parquet", iteration=3, prompts=prompts, responses=responses,
                            attention_mask=torch.cat([prompt_mask, response_mask], dim=1), uids=uids, rewards=rewards)

    assert main(["score", str(path), "--model", str(tiny_model_dir), "--device", "cpu", "--temperature",
                 str(temperature), "--token-level"]) == 0
    scored = pl.read_parquet(tmp_path / "step_3.scored.parquet")
    assert scored["group_id"].to_list() == uids and scored["traj_id"].to_list() == ["0", "1", "2"] * 2
    assert scored["iteration"].to_list() == [3] * 6 and scored["reward"].to_list() == rewards.tolist()
    logits = torch.stack(out.logits, dim=1)                                        # (B, R, V)
    for b, row in enumerate(scored.iter_rows(named=True)):
        n = int(response_mask[b].sum())
        assert row["prompt_ids"] == questions[b // samples]
        assert row["response_ids"] == responses[b, :n].tolist()
        expected = [entropy(logits[b, j], temperature) for j in range(n)]
        assert max(abs(a - e) for a, e in zip(row["token_entropy"], expected)) < 1e-5
        assert math.isclose(row["step_entropy"], float(np.mean(expected)), abs_tol=1e-5)
