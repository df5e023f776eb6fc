"""A merge on a span of a sublayer's tokens: the target grid merged and unmerged with the tokens around it passed
through (:func:`merge_span`, :func:`unmerge_span`), and an attention mask thinned to the tokens that survive
(:func:`merge_key_mask`, :func:`merge_query_key_mask`). Pure functions of a :class:`~tokensparse.merging.Matching`;
:class:`~.merging_blocks.BlockMerger` calls them."""

from __future__ import annotations

import torch
from torch import Tensor

from ..merging import Matching


def part(x: Tensor, span: tuple[int, int]) -> Tensor:
    """The tokens ``(start, length)`` of ``span``: the target grid within a sublayer's input (``x`` itself where the
    span is all of it, as in a DiT whose blocks see only the image tokens: no slicing op per sublayer call)."""
    if span[0] == 0 and span[1] == x.shape[1]:
        return x
    return x[:, span[0]:span[0] + span[1]]


def merge_span(m: Matching, x: Tensor, span: tuple[int, int], mode: str = "mean") -> Tensor:
    """Merge the target grid ``x[:, start:start + n]``; tokens around it (references) pass as they are."""
    start, n = span
    if start == 0 and n == x.shape[1]:
        return m.merge(x, mode=mode)
    return torch.cat([x[:, :start], m.merge(x[:, start:start + n], mode=mode), x[:, start + n:]], 1)


def unmerge_span(m: Matching, y: Tensor, span: tuple[int, int]) -> Tensor:
    """Inverse of :func:`merge_span` on a sublayer's output, whose target part is ``n - merged`` rows long."""
    start, k = span[0], span[1] - m.num_merged
    if start == 0 and k == y.shape[1]:
        return m.unmerge(y)
    return torch.cat([y[:, :start], m.unmerge(y[:, start:start + k]), y[:, start + k:]], 1)


def merge_key_mask(mask: Tensor, m: Matching, span: tuple[int, int], n: int) -> Tensor | None:
    """A self-attention key mask ``(B or 1, [1, [1,]] n)`` over ``n`` tokens, for the tokens :func:`merge_span`
    leaves: the entries of the surviving keys (around the span, and the span's kept tokens), in order.

    ``None`` (the sublayer must run unmerged) where that would change what attention sees: the mask is not
    over these ``n`` keys, has a query axis (``(B, n, n)``), a batch other than 1 or the matching's, or a
    merged pair whose two tokens the mask treats differently (a visible token would vanish into a masked
    one, or a masked one become visible through a visible one)."""
    b = m.batch_size
    if mask.shape[-1] != n or mask.shape[0] not in (1, b) or any(s != 1 for s in mask.shape[1:-1]):
        return None
    key = mask.reshape(mask.shape[0], n).expand(b, n)
    inner = part(key, span)
    if not torch.equal(m.unmerge(m.merge(inner, mode="keep")), inner):  # a source masked unlike its destination
        return None
    merged = merge_span(m, key, span, mode="keep")
    return merged.reshape(b, *mask.shape[1:-1], merged.shape[1])


def merge_query_key_mask(mask: Tensor, m: Matching, span: tuple[int, int], n: int) -> Tensor | None:
    """A self-attention query x key mask ``(B or 1, [1,] n, n)`` over ``n`` tokens (queries and keys the same
    tokens, e.g. Chroma's product of a key mask with itself), for the tokens :func:`merge_span` leaves: the rows
    and columns of the surviving tokens, in order.

    ``None`` (the sublayer must run unmerged) where the mask is not that, or where a merged pair's two tokens
    have different rows or columns (the merged token would attend, or be attended, unlike one of them)."""
    b = m.batch_size
    if (mask.dim() < 3 or mask.shape[-1] != n or mask.shape[-2] != n or mask.shape[0] not in (1, b)
            or any(s != 1 for s in mask.shape[1:-2])):
        return None
    sq = mask.reshape(mask.shape[0], n, n).expand(b, n, n)
    for side in (sq, sq.transpose(1, 2)):  # rows (queries), then columns (keys)
        inner = part(side, span)
        if not torch.equal(m.unmerge(m.merge(inner, mode="keep")), inner):
            return None
    rows = merge_span(m, sq, span, mode="keep")
    merged = merge_span(m, rows.transpose(1, 2), span, mode="keep").transpose(1, 2)
    return merged.reshape(b, *mask.shape[1:-2], merged.shape[1], merged.shape[2])


def keep_rows(table: Tensor, m: Matching, span: tuple[int, int], sample: int = 0) -> Tensor:
    """A per-token table without a batch axis, ``(n, ...)`` (a RoPE table): the rows of the tokens :func:`merge_span`
    leaves -- all but the span's, and the span's kept tokens of ``sample`` -- in order."""
    start, length = span
    return torch.cat([table[:start], table[start:start + length][m.keep[sample]], table[start + length:]], dim=0)
