"""Rescoring: equal to generate()'s logits, architecture-independent head path, fast paths equal the simple path."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from conftest import build_model, random_rollouts, write_rollouts
from empg_cli.config import AdvantageConfig, ScoreConfig
from empg_cli.pipeline import score_file
from empg_cli.scoring import MAX_PADDING, attention_implementation, load_policy, resolve_device, resolve_dtype, \
    token_budget_batches
from empg_cli.errors import BadUsage


def _entropy_float64(logits: torch.Tensor, temperature: float) -> list[float]:
    """Shannon entropy of softmax(logits / T), one per row, by an explicit float64 loop."""
    out = []
    for row in logits.double() / temperature:
        m = max(row.tolist())
        weights = [math.exp(v - m) for v in row.tolist()]
        total = sum(weights)
        out.append(-sum(w / total * math.log(w / total) for w in weights if w > 0))
    return out


def _generate_multi_turn(model, rng, temperature: float, turns: int = 3):
    """Sample a multi-turn dialogue with generate(); returns rows with ids and generate's per-token entropies."""
    prompt = torch.tensor(rng.integers(5, 300, size=(1, 6)), device=model.device)
    rows = []
    for step in range(turns):
        torch.manual_seed(100 + step)
        out = model.generate(prompt, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=7,
                             min_new_tokens=7, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        response = out.sequences[0, prompt.shape[1]:]
        logits = torch.cat(out.logits).cpu()  # (n_new, V), the raw logits before temperature
        rows.append({"prompt_ids": prompt[0].tolist(), "response_ids": response.tolist(),
                     "entropy": _entropy_float64(logits, temperature)})
        observation = torch.tensor(rng.integers(5, 300, size=(1, 4)), device=model.device)
        prompt = torch.cat([prompt, response[None], observation], dim=1)
    return rows


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_rescored_entropies_equal_generate_logits_multi_turn(tmp_path, prefix_sharing, device):
    model = build_model(tmp_path / "m", "qwen2").to(device)
    rng = np.random.default_rng(1)
    temperature = 0.7
    turns = _generate_multi_turn(model, rng, temperature)
    rows = {"group_id": ["g"] * len(turns), "traj_id": ["t"] * len(turns), "step": list(range(len(turns))),
            "prompt_ids": [t["prompt_ids"] for t in turns], "response_ids": [t["response_ids"] for t in turns],
            "reward": [1.0] * len(turns)}
    src = write_rollouts(tmp_path / "dialogue.parquet", rows)
    out = tmp_path / "scored.parquet"
    score_file(src, out, ScoreConfig(model=str(tmp_path / "m"), temperature=temperature, token_level=True,
                                     prefix_sharing=prefix_sharing, device=device, dtype="float32"), AdvantageConfig())
    scored = pq.read_table(out)
    got = scored.column("token_entropy").to_pylist()
    worst = max(abs(a - b) for g, t in zip(got, turns) for a, b in zip(g, t["entropy"]))
    assert all(len(g) == len(t["entropy"]) for g, t in zip(got, turns))
    assert worst < 1e-5, worst
    step_means = scored.column("step_entropy").to_pylist()
    assert step_means == pytest.approx([np.mean(t["entropy"]) for t in turns], abs=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_head_path_reproduces_model_logits(tmp_path, arch):
    build_model(tmp_path, arch)
    policy = load_policy(str(tmp_path), device=torch.device("cpu"), dtype=torch.float32)
    ids = torch.randint(5, 300, (2, 12))
    with torch.inference_mode():
        reference = policy.model(input_ids=ids).logits
        ours = policy.head(policy.model.get_decoder()(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "bias", "softcap", "logit_scale"])
def test_head_written_into_a_buffer_equals_the_head_in_float64(tmp_path, dtype, variant):
    """head(h, out=buffer), the path of every chunk, against the head and its transforms computed in float64."""
    build_model(tmp_path, "qwen2")
    policy = load_policy(str(tmp_path), device=torch.device("cpu"), dtype=dtype)
    cfg, gen = policy.model.config, torch.Generator().manual_seed(0)
    linear = policy.model.get_output_embeddings()
    if variant == "bias":
        with_bias = torch.nn.Linear(linear.in_features, linear.out_features, bias=True, dtype=dtype)
        with torch.no_grad():
            with_bias.weight.copy_(linear.weight)
            with_bias.bias.copy_(torch.randn(linear.out_features, generator=gen))
        policy.model.set_output_embeddings(with_bias)
        linear = with_bias
    cap, scale = (2.0 if variant == "softcap" else None), (0.25 if variant == "logit_scale" else None)
    cfg.final_logit_softcapping, cfg.logit_scale = cap, scale
    hidden = torch.randn(9, cfg.hidden_size, generator=gen).to(dtype)                    # (N, d)
    with torch.no_grad():
        want = hidden.double() @ linear.weight.double().T                                # (N, V)
        want = want + linear.bias.double() if linear.bias is not None else want
        want = torch.tanh(want / cap) * cap if cap else want
        want = want * scale if scale else want
    buffer = torch.full(tuple(want.shape), float("nan"))
    with torch.inference_mode():
        written, returned = policy.head(hidden, out=buffer), policy.head(hidden)
    assert written.data_ptr() == buffer.data_ptr() and written.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got in (written, returned):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory sets glibc's malloc options")
def test_freed_memory_is_reused_without_page_faults_once_kept():
    """A 48 MiB tensor made and freed again and again: by default glibc unmaps it and each new one faults its pages
    in; once keep_freed_memory() has run, the same heap memory serves them all."""
    script = textwrap.dedent("""
        import resource, torch
        from empg_cli.scoring import keep_freed_memory
        def faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(10):
                torch.ones(12 << 20)  # 48 MiB, touched, then freed
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        default = faults()
        keep_freed_memory()
        faults()  # the heap grows
        print(default, faults())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    default, kept = map(int, out.stdout.split())
    assert default > 0 and kept * 5 < default, (default, kept)  # kept: 0, at times one tensor's pages


def _score(tmp_path, model_dir, rows, name, **cfg) -> pl.DataFrame:
    src = write_rollouts(tmp_path / f"{name}.parquet", rows)
    out = tmp_path / f"{name}.scored.parquet"
    score_file(src, out, ScoreConfig(model=str(model_dir), **cfg), AdvantageConfig())
    return pl.read_parquet(out)


def test_prefix_chained_and_batched_paths_equal_the_per_step_path(tmp_path, tiny_model_dir, device):
    rows = random_rollouts(np.random.default_rng(3), iterations=1, groups=4, max_steps=5)
    simple = _score(tmp_path, tiny_model_dir, rows, "simple", prefix_sharing=False, batch_tokens=1, device=device,
                    dtype="float32")
    fast = _score(tmp_path, tiny_model_dir, rows, "fast", prefix_sharing=True, batch_tokens=100_000, device=device,
                  dtype="float32")
    for col in ("step_entropy", "step_renyi2", "step_grad_norm_sq", "step_grad_norm_sq_expected"):  # token means
        np.testing.assert_allclose(fast[col].to_numpy(), simple[col].to_numpy(), atol=1e-5, rtol=0)
    logprob_diff = np.abs(fast["step_logprob"].to_numpy() - simple["step_logprob"].to_numpy())
    per_token = logprob_diff / fast["n_response_tokens"].to_numpy()
    assert per_token.max() <= 1e-5  # a sum over the step's tokens: 1e-5 per token


def test_unchained_trajectories_fall_back_to_per_step(tmp_path, tiny_model_dir):
    rows = random_rollouts(np.random.default_rng(4), iterations=1, chained=False, max_steps=4)
    a = _score(tmp_path, tiny_model_dir, rows, "a", prefix_sharing=True)
    b = _score(tmp_path, tiny_model_dir, rows, "b", prefix_sharing=False)
    np.testing.assert_allclose(a["step_entropy"].to_numpy(), b["step_entropy"].to_numpy(), atol=1e-6)


def test_text_and_messages_inputs_score_like_their_token_ids(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [[{"role": "user", "content": "You arrive at the kitchen."}],
                [{"role": "system", "content": "Put a mug in the coffee machine."},
                 {"role": "user", "content": "Observation: nothing happens."}]]
    responses = ["Thought: open the drawer. Action: open drawer 1", "Action: go to cabinet 2"]
    rendered = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    base = {"group_id": ["g", "h"], "traj_id": ["t", "t"], "step": [0, 0], "reward": [1.0, 0.0]}
    by_ids = _score(tmp_path, tiny_model_dir, base | {
        "prompt_ids": [tok(r, add_special_tokens=False)["input_ids"] for r in rendered],
        "response_ids": [tok(r, add_special_tokens=False)["input_ids"] for r in responses]}, "ids")
    by_text = _score(tmp_path, tiny_model_dir, base | {"prompt": rendered, "response": responses}, "text")
    by_messages = _score(tmp_path, tiny_model_dir, base | {"messages": messages, "response": responses}, "msgs")
    for other in (by_text, by_messages):
        np.testing.assert_allclose(other["step_entropy"].to_numpy(), by_ids["step_entropy"].to_numpy(), atol=1e-6)
        assert other["n_response_tokens"].to_list() == by_ids["n_response_tokens"].to_list()


def test_bfloat16_path_runs_and_stays_close_to_float32(tmp_path, tiny_model_dir, device):
    rows = random_rollouts(np.random.default_rng(5), iterations=1, groups=2)
    f32 = _score(tmp_path, tiny_model_dir, rows, "f32", dtype="float32", device=device)
    bf16 = _score(tmp_path, tiny_model_dir, rows, "bf16", dtype="bfloat16", device=device)
    assert bf16["step_entropy"].dtype == pl.Float64
    np.testing.assert_allclose(bf16["step_entropy"].to_numpy(), f32["step_entropy"].to_numpy(), atol=0.1)
    assert not np.allclose(bf16["step_entropy"].to_numpy(), f32["step_entropy"].to_numpy(), atol=1e-7)


def test_truncate_prompt_left_keeps_the_response_and_records_it(tmp_path):
    build_model(tmp_path / "short", max_positions=24)
    rows = {"group_id": ["g", "g"], "traj_id": ["a", "b"], "step": [0, 0], "reward": [1.0, 0.0],
            "prompt_ids": [list(range(5, 35)), list(range(5, 12))], "response_ids": [[7, 8, 9], [10, 11]]}
    out = _score(tmp_path, tmp_path / "short", rows, "trunc", truncate_prompt="left")
    assert out["n_response_tokens"].to_list() == [3, 2]
    import json
    meta = json.loads(pq.read_schema(tmp_path / "trunc.scored.parquet").metadata[b"empg"])
    assert meta["model"]["truncated_prompts"] == 1
    # the kept prompt is the newest 21 tokens: same statistics as scoring that prompt directly
    direct = _score(tmp_path, tmp_path / "short", rows | {"prompt_ids": [list(range(14, 35)), list(range(5, 12))]},
                    "direct")
    np.testing.assert_allclose(out["step_entropy"].to_numpy(), direct["step_entropy"].to_numpy(), atol=1e-6)


def test_device_and_dtype_resolution():
    assert resolve_device("auto", cuda=True, mps=True).type == "cuda"
    assert resolve_device("auto", cuda=False, mps=True).type == "mps"
    assert resolve_device("auto", cuda=False, mps=False).type == "cpu"
    with pytest.raises(BadUsage, match="--device cuda is not available"):
        resolve_device("cuda", cuda=False, mps=False)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert attention_implementation(torch.device("cpu"), torch.float32) == "sdpa"
    assert attention_implementation(torch.device("cuda"), torch.float32) == "sdpa"


def test_packed_batches_equal_padded_batches(tmp_path, tiny_model_dir, device):
    """The FlashAttention varlen layout (one packed row, restarting positions) gives the padded results."""
    from empg_cli.scoring import score_units
    from empg_cli.sequences import Unit
    policy = load_policy(str(tiny_model_dir), device=torch.device(device), dtype=torch.float32)
    rng = np.random.default_rng(9)
    units = []
    for _ in range(7):
        tokens = rng.integers(5, 300, size=int(rng.integers(4, 40)))
        starts = np.array(sorted(rng.choice(np.arange(1, len(tokens) - 1), size=2, replace=False)))
        lengths = np.array([1, len(tokens) - starts[1]])
        units.append(Unit(tokens, np.arange(2), starts, lengths))
    padded = score_units(policy, units, temperature=0.9, batch_tokens=64, packed=False)
    packed = score_units(policy, units, temperature=0.9, batch_tokens=64, packed=True)
    for a, b in zip(padded, packed):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_batches_cover_every_unit_once_within_budget(packed):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, size=200)
    batches = token_budget_batches(lengths, 128, packed)
    assert sorted(np.concatenate(batches).tolist()) == list(range(200))
    for b in batches:
        cost = lengths[b].sum() if packed else lengths[b].max() * len(b)
        assert len(b) == 1 or cost <= 128
        assert packed or lengths[b].min() >= (1 - MAX_PADDING) * lengths[b].max()


def test_padded_batches_fill_the_budget_when_lengths_are_close():
    """The padding bound splits batches only where lengths differ: 40 units of 95-100 tokens in 1,000-token batches."""
    lengths = np.random.default_rng(2).integers(95, 101, size=40)
    batches = token_budget_batches(lengths, 1000)
    assert [len(b) for b in batches] == [10, 10, 10, 10]


def test_ranges_concatenates_aranges():
    from empg_cli.scoring import ranges
    rng = np.random.default_rng(1)
    starts, lengths = rng.integers(0, 50, size=30), rng.integers(0, 6, size=30)
    expected = [i for s, n in zip(starts, lengths) for i in range(s, s + n)]
    assert ranges(starts, lengths).tolist() == expected
