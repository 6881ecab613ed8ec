"""Exact ids from memory and from prime-rl traces: batches built from a tiny model's real generate() output, in
verl's padded layouts (single-turn, agent loop, verl-agent) and as prime-rl trace trees, become rollouts whose
rescored entropies equal generate()'s own logits."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from empg_cli.cli import main
from empg_cli.ingest import verl_agent_loop_table, verl_agent_table, verl_batch_table, write_rollouts
from ingest_layouts import prime_episode, write_prime

PAD, TEMPERATURE = 0, 0.8


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def entropy(logits: torch.Tensor) -> float:
    """Shannon entropy (nats) of softmax(logits / T), float64."""
    logp = torch.log_softmax(logits.double() / TEMPERATURE, dim=-1)
    return float(-(logp.exp() * logp).sum())


def sample(policy, context: list[int], n: int, seed: int) -> tuple[list[int], list[float]]:
    """n tokens sampled after `context`, and the entropy of each from generate()'s own logits."""
    torch.manual_seed(seed)
    out = policy.generate(torch.tensor([context]), attention_mask=torch.ones(1, len(context), dtype=torch.long),
                          do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0, min_new_tokens=n,
                          max_new_tokens=n, pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(context):].tolist(), [entropy(step[0]) for step in out.logits]


def padded(rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's padding: prompts on the left, responses on the right; (ids, mask)."""
    width = max(map(len, rows))
    ids = [[PAD] * (width - len(r)) + r if left else r + [PAD] * (width - len(r)) for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) if left else [1] * len(r) + [0] * (width - len(r)) for r in rows]
    return torch.tensor(ids), torch.tensor(mask)


def score(path, tiny_model_dir) -> pl.DataFrame:
    assert main(["score", str(path), "--model", str(tiny_model_dir), "--device", "cpu", "--temperature",
                 str(TEMPERATURE), "--token-level"]) == 0
    return pl.read_parquet(path.with_name(path.name.replace(".parquet", ".scored.parquet")))


def assert_entropies(scored: pl.DataFrame, expected: list[list[float]]) -> None:
    assert len(scored) == len(expected)
    for row, want in zip(scored.iter_rows(named=True), expected):
        assert len(row["token_entropy"]) == len(want)
        assert max(abs(a - e) for a, e in zip(row["token_entropy"], want)) < 1e-5
        assert math.isclose(row["step_entropy"], float(np.mean(want)), abs_tol=1e-5)


def test_verl_single_turn_batch(tmp_path, tiny_model_dir, policy):
    rng = np.random.default_rng(0)
    questions = [rng.integers(5, 300, size=n).tolist() for n in (9, 5)]
    samples = [sample(policy, q, n, seed) for seed, (q, n) in enumerate((q, n) for q in questions for n in (4, 2, 6))]
    prompts, prompt_mask = padded([q for q in questions for _ in range(3)], left=True)
    responses, response_mask = padded([s[0] for s in samples], left=False)
    uids = ["q0"] * 3 + ["q1"] * 3
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    path = write_rollouts(tmp_path / "step_3.parquet", verl_batch_table(
        iteration=3, prompts=prompts, responses=responses, attention_mask=torch.cat([prompt_mask, response_mask], 1),
        uids=uids, rewards=rewards))
    scored = score(path, tiny_model_dir)
    assert scored["group_id"].to_list() == uids and scored["traj_id"].to_list() == ["0", "1", "2"] * 2
    assert scored["prompt_ids"].to_list() == [q for q in questions for _ in range(3)]
    assert scored["response_ids"].to_list() == [s[0] for s in samples]
    assert scored["reward"].to_list() == rewards.tolist() and scored["iteration"].to_list() == [3] * 6
    assert_entropies(scored, [s[1] for s in samples])


def test_verl_agent_loop_rows_split_into_model_turns(tmp_path, tiny_model_dir, policy):
    """One row per trajectory: model turns (response_mask 1) separated by tool tokens (0), then padding."""
    rng = np.random.default_rng(1)
    question = rng.integers(5, 300, size=6).tolist()
    rows, masks, expected, prompts_seen = [], [], [], []
    for t, turns in enumerate(([3, 2], [4, 1, 2])):
        context, row, mask = list(question), [], []
        for k, n in enumerate(turns):
            if k:                                              # tool output between turns, not the policy's
                tool = rng.integers(5, 300, size=3).tolist()
                row, mask, context = row + tool, mask + [0] * 3, context + tool
            prompts_seen.append(list(context))
            tokens, entropies = sample(policy, context, n, seed=10 * t + k)
            row, mask, context = row + tokens, mask + [1] * n, context + tokens
            expected.append(entropies)
        rows.append(row)
        masks.append(mask)
    prompts, prompt_mask = padded([question, question], left=True)
    responses, attention = padded(rows, left=False)
    response_mask, _ = padded(masks, left=False)
    table = verl_agent_loop_table(iteration=0, prompts=prompts, responses=responses,
                                  attention_mask=torch.cat([prompt_mask, attention], 1), response_mask=response_mask,
                                  uids=["q", "q"], rewards=[1.0, 0.0])
    scored = score(write_rollouts(tmp_path / "loop.parquet", table), tiny_model_dir)
    assert scored["traj_id"].to_list() == ["0", "0", "1", "1", "1"] and scored["step"].to_list() == [0, 1, 0, 1, 2]
    assert scored["prompt_ids"].to_list() == prompts_seen and scored["reward"].to_list() == [1.0] * 2 + [0.0] * 3
    assert_entropies(scored, expected)


def test_verl_agent_step_rows_take_their_order_within_traj_uid(tmp_path, tiny_model_dir, policy):
    """verl-agent: one row per step, trajectories interleaved in the batch (step 0 of each, then step 1 ...)."""
    rng = np.random.default_rng(2)
    contexts = {"a": rng.integers(5, 300, size=5).tolist(), "b": rng.integers(5, 300, size=7).tolist()}
    prompt_rows, response_rows, traj_uids, expected = [], [], [], []
    for step in range(2):
        for traj in ("a", "b"):
            tokens, entropies = sample(policy, contexts[traj], 3, seed=step * 2 + len(traj_uids))
            prompt_rows.append(list(contexts[traj]))
            response_rows.append(tokens)
            traj_uids.append(traj)
            expected.append(entropies)
            contexts[traj] = contexts[traj] + tokens + rng.integers(5, 300, size=2).tolist()  # + observation
    prompts, prompt_mask = padded(prompt_rows, left=True)
    responses, response_mask = padded(response_rows, left=False)
    table = verl_agent_table(iteration=5, prompts=prompts, responses=responses,
                             attention_mask=torch.cat([prompt_mask, response_mask], 1), uids=["g"] * 4,
                             traj_uids=traj_uids, rewards=[1.0, 0.0, 1.0, 0.0])
    scored = score(write_rollouts(tmp_path / "agent.parquet", table), tiny_model_dir)
    assert scored["traj_id"].to_list() == traj_uids and scored["step"].to_list() == [0, 0, 1, 1]
    assert scored["prompt_ids"].to_list() == prompt_rows
    assert_entropies(scored, expected)


def test_prime_rl_traces_rescored_match_generate(tmp_path, tiny_model_dir, policy):
    """Trace trees (prompt node, sampled nodes led by masked-out template ids, environment nodes), converted with
    `empg convert`, rescored with `empg score`: entropies equal generate()'s logits."""
    rng = np.random.default_rng(3)
    episodes, expected = [], []
    for e in range(2):
        context = rng.integers(5, 300, size=5).tolist()
        nodes = [{"parent": None, "sampled": False, "token_ids": list(context), "mask": [False] * 5}]
        for turn in range(2):
            if turn:
                observation = rng.integers(5, 300, size=3).tolist()
                nodes.append({"parent": len(nodes) - 1, "sampled": False, "token_ids": observation,
                              "mask": [False] * 3})
                context += observation
            lead = [4]                                        # e.g. the assistant header, not sampled
            tokens, entropies = sample(policy, context + lead, 3 + turn, seed=10 * e + turn)
            nodes.append({"parent": len(nodes) - 1, "sampled": True, "token_ids": lead + tokens,
                          "mask": [False] + [True] * len(tokens), "logprobs": [0.0] * len(tokens)})
            context += lead + tokens
            expected.append(entropies)
        episodes.append(prime_episode(f"e{e}", "task", 1, [{"nodes": nodes,
                                                           "rewards": {"correct": {"score": e, "weight": 1.0}}}]))
    write_prime(tmp_path / "out", 1, episodes)
    assert main(["convert", str(tmp_path / "out"), "-o", str(tmp_path / "p.parquet")]) == 0
    assert_entropies(score(tmp_path / "p.parquet", tiny_model_dir), expected)
