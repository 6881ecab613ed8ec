"""Response tokens as text pieces, so that the report can colour each token by its entropy.

A piece is the text a token adds to the decoded response. Decoding one id alone is wrong for two kinds of
tokenizer: SentencePiece drops a word's leading space when the token comes first, and byte-level BPE splits a
multi-byte character over several tokens. So each id is decoded after an anchor token, and a step whose pieces do
not join into its decoded text is decoded incrementally instead (the streaming detokenizer of text-generation
servers: a token that ends inside a character adds nothing, the one that completes it adds the character).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"
"""What a decoder writes for an incomplete UTF-8 sequence."""


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def _vocabulary_pieces(tokenizer: Any, ids: set[int]) -> dict[int, str]:
    """Each id's text as it reads after another token (an anchor), which keeps leading spaces."""
    anchor = tokenizer.encode("a", add_special_tokens=False)[:1]
    prefix = _decode(tokenizer, anchor)
    ordered = sorted(ids)
    texts = tokenizer.batch_decode([anchor + [i] for i in ordered], skip_special_tokens=False)
    return {i: text[len(prefix):] if text.startswith(prefix) else _decode(tokenizer, [i])
            for i, text in zip(ordered, texts)}


def streamed_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Pieces by incremental decoding: piece k = decode(ids[p:k+1]) minus decode(ids[p:r]), where r is the first
    token not yet shown and p the one before it; "" while the text so far ends in an incomplete character (the last
    token takes what is left, so that the pieces always join into the decoded response)."""
    pieces: list[str] = []
    prefix = read = 0
    for k in range(1, len(ids) + 1):
        before = _decode(tokenizer, ids[prefix:read])
        after = _decode(tokenizer, ids[prefix:k])
        if len(after) > len(before) and (k == len(ids) or not after.endswith(REPLACEMENT)):
            pieces.append(after[len(before):])
            prefix, read = read, k
        else:
            pieces.append("")
    return pieces


def token_pieces(tokenizer: Any, responses: Sequence[Sequence[int]]) -> list[list[str]]:
    """For each response (a list of token ids), one text piece per token; the pieces join into the decoded
    response (`skip_special_tokens=False`)."""
    table = _vocabulary_pieces(tokenizer, {i for ids in responses for i in ids})
    decoded = tokenizer.batch_decode([list(ids) for ids in responses], skip_special_tokens=False)
    out = []
    for ids, text in zip(responses, decoded):
        pieces = _drop_leading_space([table[i] for i in ids], text)
        out.append(pieces if "".join(pieces) == text else streamed_pieces(tokenizer, ids))
    return out


def _drop_leading_space(pieces: list[str], text: str) -> list[str]:
    """The pieces without the whitespace they carry before `text` starts: the space that a SentencePiece or
    word-level decoder drops before a response's first word (the anchor made the first piece keep it)."""
    joined = "".join(pieces)
    extra = len(joined) - len(text)
    if extra <= 0 or joined[extra:] != text or joined[:extra].strip():
        return pieces
    out = list(pieces)
    for k, piece in enumerate(out):
        cut = min(extra, len(piece))
        out[k], extra = piece[cut:], extra - cut
        if extra == 0:
            break
    return out
