"""The naive trainer-style scorer: the reference of what users run today, and the accuracy reference.

Written from docs/method.md without empg_cli: every step is its own sequence `prompt_ids + response_ids`,
right-padded into batches of a fixed number of rows in file order (a trainer's micro-batch), one full
`model(input_ids, attention_mask)` forward, its logits cast to float32 at every position, a full-vocabulary
`log_softmax`, the entropy H = -sum_v p_v log p_v (nats) at every position, and the step entropy as the
mean over the positions that predict the step's response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class NaiveResult:
    """Per-step mean entropy (nats) in the input's row order, and how many token slots went through the model."""

    step_entropy: np.ndarray
    tokens: int
    padded_tokens: int


def naive_step_entropies(model, prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray],
                         batch_size: int) -> NaiveResult:
    """Score each row as its own sequence, `batch_size` rows per padded batch, in the given order."""
    n = len(prompts)
    out = np.empty(n, dtype=np.float64)
    tokens = padded = 0
    for start in range(0, n, batch_size):
        rows = range(start, min(start + batch_size, n))
        seqs = [np.concatenate([prompts[i], responses[i]]) for i in rows]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.from_numpy(s.astype(np.int64))
            mask[b, :len(s)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                           use_cache=False).logits.float()                                     # (B, L, V)
            logp = torch.log_softmax(logits, dim=-1)                                           # (B, L, V)
            entropy = -(logp.exp() * logp).sum(dim=-1)                                         # (B, L) nats
        for b, i in enumerate(rows):
            p, r = len(prompts[i]), len(responses[i])
            # response token j sits at position p + j and is predicted by the logits at p + j - 1
            out[i] = entropy[b, p - 1:p + r - 1].double().mean().item()
        tokens += int(mask.sum())
        padded += ids.numel()
        del logits, logp, entropy
    return NaiveResult(out, tokens, padded)
