"""The tiny policy: a byte-level BPE tokenizer with a chat template, a Llama-architecture causal LM,
behaviour cloning, and a sampler that logs each token's entropy at generation time.

Why these pieces: empg rescores logged rollouts with the checkpoint that sampled them, so the sample
must be made the way a real agent trainer makes it — chat turns rendered by a chat template, exact
sampled token ids, entropies of softmax(logits / T) at T = 1 — only small enough to train on a CPU.

Token layout of one trajectory (a prefix chain, so empg scores it in one forward pass):

    <|im_start|>user\\n{obs_0}<|im_end|>\\n<|im_start|>assistant\\n      first prompt
    {reply_0}<|im_end|>                                                  response 0 (sampled ids)
    \\n<|im_start|>user\\n{obs_1}<|im_end|>\\n<|im_start|>assistant\\n   next turn
    ...

prompt_ids of step t+1 = prompt_ids_t + response_ids_t + next-turn ids, and the chat template renders
exactly this text from the messages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, START, END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style pre-tokenisation) trained on the environment's own text."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, START, END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=END, pad_token=PAD,
                                        bos_token=None, unk_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def render(messages: Sequence[dict[str, str]]) -> str:
    """The chat template's text for a conversation (no generation prompt): what the tokenizer is trained on."""
    return "".join(f"{START}{m['role']}\n{m['content']}{END}\n" for m in messages)


class Turns:
    """Token ids of the chain's pieces, built piecewise so that every step extends the previous one exactly."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast):
        self.tokenizer = tokenizer
        self.end_id = tokenizer.convert_tokens_to_ids(END)
        self.pad_id = tokenizer.convert_tokens_to_ids(PAD)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def first(self, observation: str) -> list[int]:
        """The first prompt: the task's opening observation and the assistant header."""
        return self._ids(f"{START}user\n{observation}{END}\n{START}assistant\n")

    def next(self, observation: str) -> list[int]:
        """What follows a response (which ends in <|im_end|>): the next observation and the assistant header."""
        return self._ids(f"\n{START}user\n{observation}{END}\n{START}assistant\n")

    def reply(self, text: str) -> list[int]:
        """A demonstration reply as the policy should emit it: its tokens, then <|im_end|>."""
        return self._ids(text) + [self.end_id]

    def demonstration(self, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """A whole demonstration as one chain of ids, and which of them are reply tokens to imitate."""
        ids = self.first(messages[0]["content"])
        is_reply = [False] * len(ids)
        for reply, observation in zip(messages[1::2], [*messages[2::2], None]):
            piece = self.reply(reply["content"])
            ids, is_reply = ids + piece, is_reply + [True] * len(piece)
            if observation is not None:
                piece = self.next(observation["content"])
                ids, is_reply = ids + piece, is_reply + [False] * len(piece)
        return ids, is_reply

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def reply_content(self, ids: Sequence[int]) -> str:
        """The assistant message content of a sampled response: its text up to <|im_end|>."""
        ids = list(ids)
        return self.text(ids[:-1] if ids and ids[-1] == self.end_id else ids)


def make_model(vocab_size: int, *, hidden: int, layers: int, max_len: int, seed: int) -> LlamaForCausalLM:
    """A Llama-architecture causal LM small enough to train on a CPU (tied embeddings, float32).

    Llama rather than Qwen2: transformers 5 loads every Qwen2 checkpoint with Qwen2Tokenizer, which
    replaces our pre-tokeniser with Qwen's, so the loaded tokenizer would not reproduce the logged ids.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_len, tie_word_embeddings=True, rope_theta=10000.0,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).float()


def save_checkpoint(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """safetensors weights, config, tokenizer and chat template: what `empg score --model` loads.

    The tokenizer class is recorded as PreTrainedTokenizerFast, a name transformers 4 and 5 both resolve
    to "load tokenizer.json as it is" (5 writes its own TokenizersBackend, which 4 does not know).
    """
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")


def pad_right(rows: Sequence[Sequence[Any]], fill: Any, dtype: torch.dtype) -> torch.Tensor:
    """Sequences of different lengths as one (B, L) tensor, right-padded with `fill`."""
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for b, row in enumerate(rows):
        out[b, :len(row)] = torch.as_tensor(np.asarray(row), dtype=dtype)
    return out


def token_logprobs(model: LlamaForCausalLM, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """log pi(token_j | tokens_<j) for every position j >= 1 of right-padded sequences; (B, L-1)."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()  # (B, L-1, V)
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def behaviour_clone(model: LlamaForCausalLM, chains: Sequence[tuple[list[int], list[bool]]], *, steps: int,
                    batch_size: int, lr: float, pad_id: int, seed: int) -> list[float]:
    """Maximise the log-likelihood of the demonstrations' response tokens; returns the loss per step.

    A batch is `batch_size` chains of similar length (a random window of the length-sorted list), so
    little compute goes to padding; the learning rate warms up, then decays on a cosine to 10 %.
    """
    rng = np.random.default_rng(seed)
    by_length = sorted(chains, key=lambda chain: len(chain[0]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, 0.1 + 0.45 * (1 + np.cos(np.pi * min(1.0, s / steps)))))
    model.train()
    losses = []
    for _ in range(steps):
        start = int(rng.integers(0, len(by_length) - batch_size + 1))
        batch = by_length[start:start + batch_size]
        ids = pad_right([chain for chain, _ in batch], pad_id, torch.long)           # (B, L)
        attention = pad_right([[1] * len(chain) for chain, _ in batch], 0, torch.long)
        target = pad_right([is_response for _, is_response in batch], False, torch.bool)[:, 1:]
        logp = token_logprobs(model, ids, attention)                                   # (B, L-1)
        loss = -(logp * target).sum() / target.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.inference_mode()
def sample_replies(model: LlamaForCausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, end_id: int,
                   pad_id: int, generator: torch.Generator) -> list[tuple[list[int], list[float]]]:
    """Sample one reply per prompt at temperature 1 from the full softmax; return its ids and entropies (nats).

    Prompts are left-padded into one batch and decoded with a KV cache; position ids skip the padding so
    each row sees exactly what an unpadded forward pass (empg's rescoring) sees. A reply ends at
    <|im_end|> (kept) or after max_new_tokens.
    """
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])          # (B, L)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])    # (B, L)
    positions = (attention.cumsum(-1) - 1).clamp_min(0)                                    # (B, L)
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True)
    replies: list[tuple[list[int], list[float]]] = [([], []) for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new_tokens):
        z = out.logits[:, -1].float()                                                      # (B, V), T = 1
        logp = torch.log_softmax(z, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)                                             # (B,) nats
        token = torch.multinomial(logp.exp(), 1, generator=generator)                      # (B, 1)
        for b in torch.nonzero(~finished).flatten().tolist():
            replies[b][0].append(int(token[b]))
            replies[b][1].append(float(entropy[b]))
        finished |= token[:, 0] == end_id
        if finished.all():
            break
        attention = torch.cat([attention, torch.ones_like(token)], dim=-1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token, attention_mask=attention, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
    return replies
