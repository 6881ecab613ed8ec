"""The benchmark's inputs, built offline and deterministically: random Qwen2 models and rollout files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch


@dataclass(frozen=True)
class ModelSpec:
    """A random Qwen2 decoder: the sizes reported in RESULTS.md."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    max_positions: int

    def describe(self) -> str:
        return (f"Qwen2, vocab {self.vocab_size:,}, hidden {self.hidden_size}, {self.num_layers} layers, "
                f"MLP {self.intermediate_size}, {self.num_heads} heads / {self.num_kv_heads} KV heads, untied head")


def build_tokenizer(directory: Path) -> None:
    """A tiny word-level tokenizer: score_file needs one beside the weights, the cases give token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|pad|>": 0, "<|end|>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>").save_pretrained(directory)


def build_model(spec: ModelSpec, directory: Path, seed: int = 0, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Save a random model (safetensors, in `dtype`) and tokenizer into `directory`; return its parameter counts.

    `device` only speeds up the random initialisation of a large model (cuda).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                         intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                         num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                         max_position_embeddings=spec.max_positions, tie_word_embeddings=False)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    with torch.no_grad():  # sharper, more varied next-token distributions than the default init
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(directory, safe_serialization=True)
    build_tokenizer(directory)
    counts = {"decoder_layers": sum(p.numel() for p in model.model.layers.parameters()),
              "embedding": model.model.embed_tokens.weight.numel(), "lm_head": model.lm_head.weight.numel()}
    counts["weights_bytes"] = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    del model
    return counts


@dataclass
class Rollouts:
    """Rows of a rollouts file and, for the floor runs, the sequences empg scores (one per trajectory or step)."""

    columns: dict[str, list] = field(default_factory=lambda: {k: [] for k in (
        "run", "iteration", "group_id", "traj_id", "step", "prompt_ids", "response_ids", "reward")})
    sequences: list[np.ndarray] = field(default_factory=list)
    """The token sequences empg scores: a prefix-chained trajectory's last prompt + response, else one step's."""
    response_spans: list[list[tuple[int, int]]] = field(default_factory=list)
    """(start, length) of every response inside its sequence."""

    def add_step(self, group: str, traj: str, step: int, prompt: np.ndarray, response: np.ndarray,
                 reward: float, iteration: int = 0) -> None:
        for key, value in (("run", "bench"), ("iteration", iteration), ("group_id", group), ("traj_id", traj),
                           ("step", step), ("prompt_ids", prompt), ("response_ids", response), ("reward", reward)):
            self.columns[key].append(value)

    @property
    def n_tokens(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    @property
    def n_response_tokens(self) -> int:
        return int(sum(n for spans in self.response_spans for _, n in spans))

    def order(self, keys: list[str]) -> np.ndarray:
        """Row order sorted by the given columns (a stable order for the file)."""
        return pl.DataFrame({k: self.columns[k] for k in keys}).with_row_index().sort(keys)["index"].to_numpy()

    def write(self, path: Path, order: np.ndarray | None = None) -> Path:
        types = {"iteration": pa.int64(), "step": pa.int64(), "prompt_ids": pa.list_(pa.int32()),
                 "response_ids": pa.list_(pa.int32()), "reward": pa.float64()}
        order = np.arange(len(self.columns["run"])) if order is None else order
        table = pa.table({k: pa.array([v[i] for i in order], types.get(k)) for k, v in self.columns.items()})
        pq.write_table(table, path)
        return path

    def rows(self, order: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(prompt ids, response ids) per row in file order, for the naive scorer."""
        return ([np.asarray(self.columns["prompt_ids"][i]) for i in order],
                [np.asarray(self.columns["response_ids"][i]) for i in order])


def multi_turn(rng: np.random.Generator, vocab: int, *, trajectories: int, group_size: int, steps: tuple[int, int],
               first_prompt: tuple[int, int], response: tuple[int, int], observation: tuple[int, int]) -> Rollouts:
    """Agent trajectories whose prompt at step t+1 is prompt_t + response_t + observation_t (a prefix chain)."""
    out = Rollouts()

    def ids(lo_hi: tuple[int, int]) -> np.ndarray:
        return rng.integers(10, vocab, size=int(rng.integers(lo_hi[0], lo_hi[1] + 1))).astype(np.int32)

    for t in range(trajectories):
        group, reward = f"task{t // group_size}", float(rng.integers(0, 2))
        prompt, spans = ids(first_prompt), []
        n_steps = int(rng.integers(steps[0], steps[1] + 1))
        for s in range(n_steps):
            resp = ids(response)
            out.add_step(group, f"t{t}", s, prompt, resp, reward)
            spans.append((len(prompt), len(resp)))
            if s < n_steps - 1:
                prompt = np.concatenate([prompt, resp, ids(observation)])
        out.sequences.append(np.concatenate([prompt, resp]))
        out.response_spans.append(spans)
    return out


def single_turn_groups(rng: np.random.Generator, vocab: int, *, groups: int, group_size: int,
                       prompt: tuple[int, int], response: tuple[int, int]) -> Rollouts:
    """GRPO groups: `group_size` sampled responses to one prompt; every row is a one-step trajectory."""
    out = Rollouts()
    for g in range(groups):
        p = rng.integers(10, vocab, size=int(rng.integers(prompt[0], prompt[1] + 1))).astype(np.int32)
        for i in range(group_size):
            r = rng.integers(10, vocab, size=int(rng.integers(response[0], response[1] + 1))).astype(np.int32)
            out.add_step(f"q{g}", f"s{i}", 0, p, r, float(rng.integers(0, 2)))
            out.sequences.append(np.concatenate([p, r]))
            out.response_spans.append([(len(p), len(r))])
    return out


def advantage_frame(rng: np.random.Generator, *, iterations: int, groups: int, group_size: int,
                    steps: int) -> pl.DataFrame:
    """A step frame (the columns compute_advantages reads) with rows in lock-step logging order.

    Rows go iteration, step, group, trajectory: how a vectorised multi-turn rollout logs its environments.
    """
    n_traj = iterations * groups * group_size
    traj_reward = rng.integers(0, 2, size=n_traj).astype(np.float64)
    it, step, grp, traj = (a.ravel() for a in np.meshgrid(np.arange(iterations), np.arange(steps),
                                                          np.arange(groups), np.arange(group_size), indexing="ij"))
    traj_index = (it * groups + grp) * group_size + traj
    return pl.DataFrame({
        "iteration": it.astype(np.int64), "group": grp.astype(np.int64), "traj": traj.astype(np.int64),
        "step": step.astype(np.int64), "reward": traj_reward[traj_index],
        "step_entropy": rng.uniform(0.05, 3.0, size=len(it)),
    }).with_columns(run=pl.lit("bench"), group_id=pl.format("g{}", "group"), traj_id=pl.format("t{}", "traj")).select(
        "run", "iteration", "group_id", "traj_id", "step", "reward", "step_entropy", "group")
