"""Fixtures: tiny Hugging Face models and tokenizers built offline, and random multi-turn rollouts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "Thought: the key is probably in the drawer. Action: open drawer 1",
    "You arrive at the kitchen. On the counter you see an apple, a mug and a knife.",
    "Observation: nothing happens. Thought: try the cabinet. Action: go to cabinet 2",
    "You are in the middle of a room. Your task is to put a clean mug in the coffee machine.",
] * 20


def build_tokenizer(directory: Path):
    """A byte-level BPE tokenizer trained on a tiny corpus, with special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_model(directory: Path, arch: str = "qwen2", vocab_size: int = 320, max_positions: int = 512, seed: int = 0):
    """A random tiny causal LM saved as safetensors, with the tokenizer beside it."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4,
                                           n_positions=max_positions))
    with torch.no_grad():  # sharper, more varied distributions than the default init
        model.get_output_embeddings().weight.mul_(20.0)
    model.save_pretrained(directory, safe_serialization=True)
    build_tokenizer(directory)
    return model.eval()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                             reason="no CUDA device on this machine"))]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each device test runs on the CPU, and on CUDA where a GPU is present."""
    return request.param


@pytest.fixture(autouse=True)
def cpu_unless_device_test(request, monkeypatch):
    """A test that does not take `device` checks logic to float32 precision: on a GPU machine `--device auto`
    would pick cuda and bfloat16, so such tests see no GPU. Device tests take the `device` fixture."""
    if "device" not in request.fixturenames:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    build_model(directory, "qwen2")
    return directory


def random_rollouts(rng: np.random.Generator, *, vocab: int = 300, iterations: int = 2, groups: int = 3,
                    max_group: int = 4, max_steps: int = 4, chained: bool = True, last_step_reward: bool = False,
                    shuffle: bool = True) -> dict[str, list]:
    """Ragged multi-turn rollouts with token ids; prompts extend the previous prompt + response when chained."""
    rows: dict[str, list] = {k: [] for k in ("run", "iteration", "group_id", "traj_id", "step", "prompt_ids",
                                             "response_ids", "reward")}
    for it in range(iterations):
        for g in range(groups):
            for t in range(int(rng.integers(1, max_group + 1))):
                reward = float(rng.integers(0, 2))
                steps = int(rng.integers(1, max_steps + 1))
                prompt = list(rng.integers(5, vocab, size=int(rng.integers(3, 9))))
                for s in range(steps):
                    response = list(rng.integers(5, vocab, size=int(rng.integers(1, 7))))
                    rows["run"].append("r")
                    rows["iteration"].append(it)
                    rows["group_id"].append(f"g{g}")
                    rows["traj_id"].append(f"t{t}")
                    rows["step"].append(s)
                    rows["prompt_ids"].append(prompt)
                    rows["response_ids"].append(response)
                    rows["reward"].append(None if last_step_reward and s < steps - 1 else reward)
                    observation = list(rng.integers(5, vocab, size=int(rng.integers(1, 5))))
                    prompt = (prompt + response + observation) if chained else list(
                        rng.integers(5, vocab, size=int(rng.integers(3, 9))))
    if shuffle:
        order = rng.permutation(len(rows["run"]))
        rows = {k: [v[i] for i in order] for k, v in rows.items()}
    return rows


def write_rollouts(path: Path, rows: dict[str, list], metadata: dict | None = None) -> Path:
    """Write rows as Parquet with the rollouts schema's Arrow types."""
    types = {"iteration": pa.int64(), "step": pa.int64(), "prompt_ids": pa.list_(pa.int32()),
             "response_ids": pa.list_(pa.int32()), "reward": pa.float64(), "token_entropy": pa.list_(pa.float32()),
             "advantage": pa.float64()}
    table = pa.table({k: pa.array(v, types.get(k)) for k, v in rows.items()})
    if metadata is not None:
        import json
        table = table.replace_schema_metadata({b"empg": json.dumps(metadata).encode()})
    pq.write_table(table, path)
    return path


@pytest.fixture
def rollouts_file(tmp_path) -> Path:
    return write_rollouts(tmp_path / "runs.parquet", random_rollouts(np.random.default_rng(0)))
