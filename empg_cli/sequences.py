"""Token sequences to score: ids from ids / text / chat messages, and prefix-chain packing of trajectories.

Text is tokenised with add_special_tokens=False; messages with the tokenizer's chat template and its
generation prompt (docs/method.md, data model). Ids win over text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import BadInput, ModelLoadError
from .validation import Problems


@dataclass(frozen=True)
class TokenRows:
    """Token ids of many rows as one flat array plus offsets (row i is values[offsets[i]:offsets[i+1]])."""

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]]) -> "TokenRows":
        lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        values = np.fromiter((t for x in lists for t in x), dtype=np.int64, count=int(lengths.sum()))
        return cls(values, np.concatenate([[0], np.cumsum(lengths)]))

    @classmethod
    def from_arrow(cls, array: pa.Array | pa.ChunkedArray) -> "TokenRows":
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
        values = pc.list_flatten(array).to_numpy(zero_copy_only=False).astype(np.int64)
        return cls(values, np.concatenate([[0], np.cumsum(lengths)]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def token_rows(table: pa.Table, column: str, tokenizer: Any, path: Path) -> TokenRows:
    """Token ids of `column` for every row of `table`: ids as given, text tokenised, messages templated."""
    array = table.column(column)
    if column.endswith("_ids"):
        return TokenRows.from_arrow(array)
    if tokenizer is None:
        raise ModelLoadError(f"{path}: column '{column}' is text, and the model folder has no tokenizer files; "
                             "save the tokenizer beside the weights, or give prompt_ids and response_ids")
    if column == "messages":
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError(f"{path}: column 'messages' needs a tokenizer with a chat template, and this "
                                 "model's tokenizer has none; give prompt_ids or prompt instead")
        rendered = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                    for m in array.to_pylist()]
        return TokenRows.from_lists(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return TokenRows.from_lists(tokenizer(array.to_pylist(), add_special_tokens=False)["input_ids"])


def check_vocabulary(tokens: TokenRows, vocab_size: int, problems: Problems, column: str,
                     row_ids: np.ndarray) -> None:
    """Every id is in [0, vocab_size): each row holding one outside is a problem, its first such id shown;
    `row_ids` maps token rows to file rows for the message."""
    outside = np.flatnonzero((tokens.values < 0) | (tokens.values >= vocab_size))
    token_rows_hit, first = np.unique(np.searchsorted(tokens.offsets, outside, side="right") - 1, return_index=True)
    problems.add_rows(column, row_ids[token_rows_hit], lambda k: f"token id {tokens.values[outside[first[k]]]} is "
                                                                 f"outside the model's vocabulary (0..{vocab_size - 1})")


@dataclass(frozen=True)
class Unit:
    """One sequence to score and the responses it holds: response k is tokens[starts[k]:starts[k]+lengths[k]]."""

    tokens: np.ndarray
    rows: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray


def _is_chain(prompts: TokenRows, responses: TokenRows, rows: np.ndarray) -> bool:
    """prompt_{t+1} starts with prompt_t + response_t for every step t (rows in step order)."""
    for a, b in zip(rows[:-1], rows[1:]):
        p, r, nxt = prompts[a], responses[a], prompts[b]
        n = len(p) + len(r)
        if len(nxt) < n or not (np.array_equal(nxt[:len(p)], p) and np.array_equal(nxt[len(p):n], r)):
            return False
    return True


def plan_units(trajectories: Sequence[np.ndarray], prompts: TokenRows, responses: TokenRows, *,
               max_len: int | None, truncate_left: bool, share_prefix: bool, path: Path,
               row_ids: np.ndarray) -> tuple[list[Unit], int]:
    """Sequences to score: one per prefix-chained trajectory, else one per step.

    `trajectories` holds each trajectory's row positions (into prompts/responses) in step order; `row_ids`
    maps those positions to file rows for messages. Returns the units and how many prompts were truncated.
    """
    limit = max_len or np.iinfo(np.int64).max
    units: list[Unit] = []
    too_long: list[int] = []
    truncated = 0
    for rows in trajectories:
        if share_prefix and len(rows) > 1 and _is_chain(prompts, responses, rows):
            last = rows[-1]
            tokens = np.concatenate([prompts[last], responses[last]])
            if len(tokens) <= limit:
                units.append(Unit(tokens, rows, prompts.lengths[rows], responses.lengths[rows]))
                continue
        for row in rows:
            p, r = prompts[row], responses[row]
            if len(p) + len(r) > limit:
                keep = limit - len(r)
                if not truncate_left or keep < 1:
                    too_long.append(int(row))
                    continue
                p, truncated = p[len(p) - keep:], truncated + 1
            units.append(Unit(np.concatenate([p, r]), np.array([row]), np.array([len(p)]), np.array([len(r)])))
    if too_long:
        first = sorted(int(row_ids[r]) for r in too_long)
        shown = ", ".join(map(str, first[:8])) + (f" and {len(first) - 8} more" if len(first) > 8 else "")
        hint = ("the response alone does not fit" if truncate_left
                else "pass --truncate-prompt left to drop the oldest prompt tokens")
        raise BadInput(path, f"{len(first)} sequence(s) exceed the model's context of {limit} tokens (rows {shown}); "
                             f"{hint}", row=first[0])
    return units, truncated
