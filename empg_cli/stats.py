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
"""Logit elements (positions x vocabulary) materialised at once: 128 MiB of float32, a few such temporaries."""


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


def token_stats_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> TokenStats:
    """Statistics of softmax(logits / T) at each row; logits (N, V) any float dtype, targets (N,) token ids.

    Two (N, V) float32 temporaries, reused in place: s = (z - max z) / T, and q = exp(s) (unnormalised p).
    With Z = sum q: H = log Z - sum(q s) / Z, sum p^2 = sum(q^2) / Z^2, log p_a = s_a - log Z.
    Sums use torch's pairwise reduction (a dot product accumulating in float32 loses ~1e-5 nats at 150k).
    """
    shifted = logits.to(torch.float32, copy=True)                                  # (N, V), a fresh float32 copy
    shifted.sub_(shifted.amax(dim=-1, keepdim=True))
    if temperature != 1.0:
        shifted.div_(temperature)
    shifted.clamp_(min=torch.finfo(torch.float32).min)  # -inf logits: q = 0 and q * s = 0, not NaN
    q = torch.exp(shifted)                                                         # (N, V) in (0, 1]
    total = q.sum(dim=-1)                                                          # (N,) >= 1
    log_total = torch.log(total)
    logprob = shifted.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - log_total
    entropy = log_total - shifted.mul_(q).sum(dim=-1) / total                      # nats
    sum_p2 = q.square_().sum(dim=-1) / total.square()
    return TokenStats(entropy.clamp_min(0.0), sum_p2, logprob)


def token_stats_from_hidden(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                            temperature: float = 1.0, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> TokenStats:
    """Apply the LM head to hidden states (N, d) in chunks of positions and reduce each chunk at once.

    Peak memory is O(chunk_elements), independent of N x V: full-vocabulary logits exist for one chunk only.
    """
    n = hidden.shape[0]
    if n == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return TokenStats(empty, empty, empty)
    rows = max(1, chunk_elements // head(hidden[:1]).shape[-1])
    parts = [token_stats_from_logits(head(hidden[i:i + rows]), targets[i:i + rows], temperature)
             for i in range(0, n, rows)]
    return TokenStats(*(torch.cat(cols) for cols in zip(*parts)))
