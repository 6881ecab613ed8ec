"""Per-token statistics of the next-token distribution p = softmax(z / T), in float32 whatever the model dtype.

From one pass of reductions over the vocabulary (docs/method.md, EMPG Proposition 1):
  H     = -sum_v p_v log p_v              Shannon entropy (nats)
  C     = sum_v p_v^2
  log p_a                                 log-prob of the sampled token a
and from those H2 = -log C, ||grad_z log pi(a)||^2 = 1 - 2 p_a + C, E_a[...] = 1 - C.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

DEFAULT_CHUNK_ELEMENTS = 1 << 25
"""Logit elements (positions x vocabulary) materialised at once: two buffers of 128 MiB of float32."""


class TokenStats(NamedTuple):
    """Per-token statistics, each a float32 tensor of shape (N,)."""

    entropy: torch.Tensor
    sum_p2: torch.Tensor
    logprob: torch.Tensor

    @property
    def renyi2(self) -> torch.Tensor:
        """H2 = -log sum p^2 (nats)."""
        return -torch.log(self.sum_p2)

    @property
    def grad_norm_sq(self) -> torch.Tensor:
        """||grad_z log pi(a)||^2 = 1 - 2 p_a + sum p^2 (gradient w.r.t. the scaled logits z/T)."""
        return 1.0 - 2.0 * torch.exp(self.logprob) + self.sum_p2

    @property
    def grad_norm_sq_expected(self) -> torch.Tensor:
        """E_{a~p}||grad_z log pi(a)||^2 = 1 - sum p^2 (EMPG Proposition 1)."""
        return 1.0 - self.sum_p2


Head = Callable[..., torch.Tensor]
"""`head(hidden)` -> logits (N, V); `head(hidden, out=buf)` writes them into a float32 buffer (N, V) and returns it."""


def token_stats_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> TokenStats:
    """Statistics of softmax(logits / T) at each row; logits (N, V) any float dtype, targets (N,) token ids."""
    shifted = logits.to(torch.float32, copy=True)                                  # (N, V), a fresh float32 copy
    return _reduce(shifted, torch.empty_like(shifted), targets, temperature)


def _reduce(shifted: torch.Tensor, q: torch.Tensor, targets: torch.Tensor, temperature: float) -> TokenStats:
    """The statistics from float32 logits `shifted` (N, V), overwritten, and `q`, a float32 buffer of that shape.

    In place: s = (z - max z) / T, and q = exp(s) (unnormalised p).
    With Z = sum q: H = log Z - sum(q s) / Z, sum p^2 = sum(q^2) / Z^2, log p_a = s_a - log Z.
    Sums use torch's pairwise reduction (a dot product accumulating in float32 loses ~1e-5 nats at 150k).
    """
    shifted.sub_(shifted.amax(dim=-1, keepdim=True))
    if temperature != 1.0:
        shifted.div_(temperature)
    shifted.clamp_(min=torch.finfo(torch.float32).min)  # -inf logits: q = 0 and q * s = 0, not NaN
    torch.exp(shifted, out=q)                                                      # (N, V) in (0, 1]
    total = q.sum(dim=-1)                                                          # (N,) >= 1
    log_total = torch.log(total)
    logprob = shifted.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - log_total
    entropy = log_total - shifted.mul_(q).sum(dim=-1) / total                      # nats
    sum_p2 = q.square_().sum(dim=-1) / total.square()
    return TokenStats(entropy.clamp_min(0.0), sum_p2, logprob)


def logit_buffers(positions: int, vocab: int, device: torch.device,
                  chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """(2, rows, V) float32: the logits and exp(logits) of up to `rows` positions at once, rows x V at most
    chunk_elements (one row at least), and no more rows than `positions` needs."""
    rows = max(1, min(positions, chunk_elements // vocab))
    return torch.empty(2, rows, vocab, dtype=torch.float32, device=device)


def token_stats_from_hidden(hidden: torch.Tensor, head: Head, targets: torch.Tensor, temperature: float = 1.0,
                            chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                            buffers: torch.Tensor | None = None) -> TokenStats:
    """Apply the LM head to hidden states (N, d) in chunks of positions and reduce each chunk at once.

    Peak memory is O(chunk_elements), independent of N x V: full-vocabulary logits exist for one chunk only. Every
    chunk is written into the same two buffers (logit_buffers; a caller scoring many batches passes its own, which
    then set the chunk size): on the CPU, buffers allocated afresh are page-faulted in and zeroed by the kernel
    every time.
    """
    n = hidden.shape[0]
    if n == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return TokenStats(empty, empty, empty)
    if buffers is None:
        buffers = logit_buffers(n, head(hidden[:1]).shape[-1], hidden.device, chunk_elements)
    logits, q = buffers
    rows = logits.shape[0]
    parts = []
    for i in range(0, n, rows):
        m = min(rows, n - i)
        parts.append(_reduce(head(hidden[i:i + m], out=logits[:m]), q[:m], targets[i:i + m], temperature))
    return TokenStats(*(torch.cat(cols) for cols in zip(*parts)))
