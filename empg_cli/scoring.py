"""Load a causal LM safely and rescore response tokens: per-token entropy, sum p^2 and log-prob (docs/method.md).

The base model runs once per token-budget batch; the LM head is applied only at the positions that
predict response tokens, in chunks (stats.token_stats_from_hidden), so no full-vocabulary logits are
ever built for prompt positions and peak memory does not grow with vocabulary x positions.

Why not transformers' `logits_to_keep`: its index tensor is shared by every row of a batch (our rows have
their responses at different positions) and it returns all kept logits at once, (B, K, V) in the model's
dtype; 16k response tokens at a 152k vocabulary would be 4.6 GiB in bf16 before any float32 statistic.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import BadUsage, ModelLoadError
from .sequences import Unit
from .stats import TokenStats, logit_buffers, token_stats_from_hidden

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
HEAD_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
MAX_PADDING = 0.05
"""Padding is compute spent on nothing (attention grows with the square of the padded length), and the units of a
small chunk differ widely in length: a padded batch takes only units within 5% of its longest."""
HEAP_BLOCK_BYTES = 64 << 20
HEAP_KEEP_BYTES = 512 << 20
"""CPU scoring keeps freed memory for the next batch (keep_freed_memory): blocks up to HEAP_BLOCK_BYTES come from
the heap, and up to HEAP_KEEP_BYTES of free heap stay with the process."""


def resolve_device(name: str, *, cuda: bool | None = None, mps: bool | None = None) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must be available."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    mps = (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()) if mps is None else mps
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise BadUsage(f"--device {name} is not available on this machine (use --device auto or cpu)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on cuda and float32 elsewhere; statistics are float32 either way."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def attention_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """FlashAttention-2 on cuda in half precision when installed, else PyTorch SDPA."""
    if device.type == "cuda" and dtype != torch.float32 and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of handing it back to the OS after every tensor.

    By default glibc unmaps blocks over an adaptive threshold (32 MiB at most) and trims the heap's free top beyond
    twice that, so every forward pass on the CPU faults its activations back in, zeroed by the kernel: a fifth of
    the scoring time of a small model went to the kernel (bench/RESULTS.md). PyTorch's CPU tuning guide swaps in
    jemalloc or tcmalloc for the same reason; these two glibc settings (process-wide) do it without a preload.
    Does nothing on other C libraries.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, HEAP_BLOCK_BYTES)
    mallopt(m_trim_threshold, HEAP_KEEP_BYTES)


def weights_sha256(directory: Path) -> str:
    """sha256 over the weight files of a checkpoint folder (name and content of each, in name order)."""
    digest = hashlib.sha256()
    for f in sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        with open(f, "rb") as fh:
            digest.update(f.name.encode() + b"\0" + hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def local_model_dir(ref: str) -> Path | None:
    """The folder holding a model's files: the path itself, or the hub cache's snapshot of a hub id."""
    if Path(ref).is_dir():
        return Path(ref)
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:  # not in the cache: no hash rather than a network call
        return None


@dataclass
class Policy:
    """A loaded model and what the scorer needs to know about it."""

    model: Any
    tokenizer: Any | None
    """None when a local checkpoint has no tokenizer files (token-id inputs need none)."""
    ref: str
    weights_sha256: str | None
    device: torch.device
    dtype: torch.dtype
    max_len: int | None
    vocab_size: int

    def head(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from final hidden states, with the post-head transforms some architectures apply; with `out`
        (float32, (N, V)) they are written into it (stats.Head)."""
        linear = self.model.get_output_embeddings()
        if out is None:
            logits = linear(hidden)
        elif type(linear) is torch.nn.Linear and hidden.dtype == out.dtype:
            weight = linear.weight.t()
            logits = (torch.mm(hidden, weight, out=out) if linear.bias is None
                      else torch.addmm(linear.bias, hidden, weight, out=out))
        else:
            logits = out.copy_(linear(hidden))
        cfg = self.model.config  # the transforms work in place: `logits` is a fresh tensor or the caller's buffer
        if getattr(cfg, "final_logit_softcapping", None):  # Gemma 2/3
            cap = cfg.final_logit_softcapping
            logits.div_(cap).tanh_().mul_(cap)
        if getattr(cfg, "logit_scale", None) not in (None, 1.0):  # Cohere
            logits.mul_(cfg.logit_scale)
        return logits


def load_policy(ref: str, *, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False,
                trust_remote_code: bool = False) -> Policy:
    """Load model and tokenizer: safetensors only and no remote code unless allowed (docs/method.md, files)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one the user watches

    looks_local = ref.startswith((".", "/", "~")) or Path(ref).exists() or ref.count("/") > 1
    if looks_local and not Path(ref).is_dir():
        raise ModelLoadError(f"model folder {ref} does not exist")
    # transformers builds an empty tokenizer for a folder without tokenizer files; we want none instead
    has_tokenizer = not Path(ref).is_dir() or any((Path(ref) / f).exists() for f in TOKENIZER_FILES)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code) if has_tokenizer else None
        model = AutoModelForCausalLM.from_pretrained(
            ref, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True,
            attn_implementation=attention_implementation(device, dtype))
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "trust_remote_code" in str(exc):
            hint = " (the checkpoint runs its own code: pass --trust-remote-code if you trust it)"
        else:
            hint = "" if allow_pickle else " (only safetensors weights load unless --allow-pickle is given)"
        raise ModelLoadError(f"cannot load model {ref}: {first}{hint}") from exc
    model.to(device).eval()
    if device.type == "cpu":
        keep_freed_memory()
    local = local_model_dir(ref)
    max_len = getattr(model.config, "max_position_embeddings", None)
    return Policy(model, tokenizer, ref, weights_sha256(local) if local else None, device, dtype, max_len,
                  model.get_input_embeddings().num_embeddings)


def token_budget_batches(lengths: np.ndarray, batch_tokens: int, packed: bool = False) -> list[np.ndarray]:
    """Unit indices grouped longest first within a token budget (one unit at least per batch).

    Padded batches cost (longest length x count) and take a unit only if it is at most MAX_PADDING shorter than
    their longest; packed batches cost the sum of lengths.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, current, cost = [], [], 0
    for i in order:
        n = int(lengths[i])
        grown = cost + n if packed else (int(lengths[current[0]]) if current else n) * (len(current) + 1)
        if current and (grown > batch_tokens or (not packed and n < (1 - MAX_PADDING) * lengths[current[0]])):
            batches.append(np.array(current))
            current, grown = [], n
        current.append(i)
        cost = grown
    if current:
        batches.append(np.array(current))
    return batches


@dataclass
class Batch:
    """Model inputs for some units, and for every response token its (row, position - 1) and target id."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor | None
    rows: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """concat(arange(s, s + n) for s, n in zip(starts, lengths)), without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    begin = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - begin, lengths) + np.arange(int(lengths.sum()))


def make_batch(units: Sequence[Unit], packed: bool) -> Batch:
    """Right-padded rows (B, L), or all units packed in one row (1, sum L) with restarting positions.

    Padding needs no attention mask: it comes after every real token of its row, and causal attention never looks
    ahead, so the real tokens' hidden states are those of the unpadded rows. Without a mask SDPA runs its causal
    kernel (with a padding mask, CPU attention took twice as long). transformers reads restarting position_ids as
    packed sequences: a block-diagonal causal mask, or FlashAttention's varlen kernel, so no token attends across
    units.
    """
    lengths = np.array([len(u.tokens) for u in units])
    spans = np.array([len(u.starts) for u in units])
    starts, span_lengths = np.concatenate([u.starts for u in units]), np.concatenate([u.lengths for u in units])
    unit_of_span = np.repeat(np.arange(len(units)), spans)
    tokens = np.concatenate([u.tokens for u in units])
    if packed:  # positions inside the one packed row: each unit starts where the previous one ended
        starts = starts + np.repeat(np.cumsum(lengths) - lengths, spans)
        ids, rows = tokens[None], np.zeros(int(span_lengths.sum()), dtype=np.int64)
        position_ids = torch.from_numpy(ranges(np.zeros_like(lengths), lengths)[None])
    else:
        ids = np.zeros((len(units), lengths.max()), dtype=np.int64)
        valid = np.arange(lengths.max()) < lengths[:, None]
        ids[valid] = tokens
        position_ids = None
        rows = np.repeat(unit_of_span, span_lengths)
    # response token at position s + j is predicted by the hidden state at s + j - 1
    positions = ranges(starts, span_lengths) - 1
    return Batch(torch.from_numpy(ids), position_ids, torch.from_numpy(rows), torch.from_numpy(positions),
                 torch.from_numpy(ids[rows, positions + 1]))


def _check_head(policy: Policy, tokens: np.ndarray, hidden: torch.Tensor) -> None:
    """Once per model: the head path must reproduce the model's own logits, else the architecture is unsupported."""
    n = min(len(tokens), 8)
    with torch.inference_mode():
        ids = torch.from_numpy(np.asarray(tokens[:n], dtype=np.int64))[None].to(policy.device)
        reference = policy.model(input_ids=ids, use_cache=False).logits[0].float()
    ours = policy.head(hidden[:n]).float()
    err = (ours - reference).abs().max().item()
    if err > HEAD_CHECK_TOLERANCE[policy.dtype] * max(1.0, reference.abs().max().item()):
        raise ModelLoadError(f"model {policy.ref}: its logits are not lm_head(final hidden state) (max diff {err:.3g}); "
                             "this architecture is not supported by empg's response-only scorer")


def score_units(policy: Policy, units: Sequence[Unit], *, temperature: float, batch_tokens: int,
                on_batch: Callable[[int, int], None] | None = None, packed: bool | None = None) -> TokenStats:
    """Per-token statistics of all units' responses, concatenated in unit order (responses in unit order).

    `packed` (default: when the model runs FlashAttention-2) puts each batch's units in one row without padding.
    `on_batch(steps, tokens)` is called after each batch.
    """
    if packed is None:
        packed = getattr(policy.model.config, "_attn_implementation", None) == "flash_attention_2"
    decoder = policy.model.get_decoder()
    lengths = np.array([len(u.tokens) for u in units], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([int(u.lengths.sum()) for u in units])])
    steps = np.array([len(u.rows) for u in units])
    out = TokenStats(*(torch.empty(int(offsets[-1]), dtype=torch.float32) for _ in range(3)))
    batches = token_budget_batches(lengths, batch_tokens, packed)
    buffers = None
    for members in batches:
        batch = make_batch([units[i] for i in members], packed)
        to = lambda t: None if t is None else t.to(policy.device)  # noqa: E731
        with torch.inference_mode():
            hidden = decoder(input_ids=to(batch.input_ids), position_ids=to(batch.position_ids),
                             use_cache=False).last_hidden_state  # (B, L, d)
            selected = hidden[to(batch.rows), to(batch.positions)]  # (N, d)
            if buffers is None:  # once: check the head path, and size the logit buffers every batch reuses
                _check_head(policy, units[members[0]].tokens, hidden[0, :len(units[members[0]].tokens)])
                most = max(int(offsets[m + 1].sum() - offsets[m].sum()) for m in batches)
                buffers = logit_buffers(most, policy.head(selected[:1]).shape[-1], policy.device)
            stats = token_stats_from_hidden(selected, policy.head, to(batch.targets), temperature, buffers=buffers)
        # scatter the batch's tokens (in batch order) to their units' places in the output
        where = torch.from_numpy(ranges(offsets[members], offsets[members + 1] - offsets[members]))
        for dst, src in zip(out, stats):
            dst[where] = src.float().cpu()
        if on_batch:
            on_batch(int(steps[members].sum()), int(lengths[members].sum()))
    return out
