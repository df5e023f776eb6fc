"""A merge on a span of a sublayer's tokens: the target grid merged and unmerged with the tokens around it passed
through (:func:`merge_span`, :func:`unmerge_span`), and an attention mask thinned to the tokens that survive
(:func:`merge_key_mask`, :func:`merge_query_key_mask`). Pure functions of a :class:`~tokensparse.merging.Matching`;
:class:`~.merging_blocks.BlockMerger` calls them.

A query x key mask whose span is uniform (:func:`span_is_uniform`: OmniGen's, Chroma's) is thinned by slicing
(:func:`thin_uniform`), whatever tokens the matching keeps; :class:`SquareMasks` remembers, for one model call, whether
the mask its blocks share is, and its thinnings."""

from __future__ import annotations

import weakref
from collections.abc import Hashable

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


def square(mask: Tensor, b: int, n: int) -> Tensor | None:
    """A query x key mask ``(B or 1, [1,] n, n)`` over ``n`` tokens as ``(B or 1, n, n)`` (a view), or ``None`` where
    ``mask`` is not one for a batch of ``b``."""
    if (mask.dim() < 3 or mask.shape[-1] != n or mask.shape[-2] != n or mask.shape[0] not in (1, b)
            or any(s != 1 for s in mask.shape[1:-2])):
        return None
    return mask.reshape(mask.shape[0], n, n)


def merge_query_key_mask(mask: Tensor, m: Matching, span: tuple[int, int], n: int) -> Tensor | None:
    """A self-attention query x key mask ``(B or 1, [1,] n, n)`` over ``n`` tokens (queries and keys the same
    tokens, e.g. Chroma's product of a key mask with itself), for the tokens :func:`merge_span` leaves: the rows
    and columns of the surviving tokens, in order.

    ``None`` (the sublayer must run unmerged) where the mask is not that, or where a merged pair's two tokens
    have different rows or columns (the merged token would attend, or be attended, unlike one of them)."""
    b = m.batch_size
    sq = square(mask, b, n)
    if sq is None:
        return None
    sq = sq.expand(b, n, n)
    for side in (sq, sq.transpose(1, 2)):  # rows (queries), then columns (keys)
        inner = part(side, span)
        if not torch.equal(m.unmerge(m.merge(inner, mode="keep")), inner):
            return None
    rows = merge_span(m, sq, span, mode="keep")
    merged = merge_span(m, rows.transpose(1, 2), span, mode="keep").transpose(1, 2)
    return merged.reshape(b, *mask.shape[1:-2], merged.shape[1], merged.shape[2])


def span_is_uniform(sq: Tensor, span: tuple[int, int]) -> bool:
    """Whether every token of ``span`` ``(start, length)`` has the same row and the same column in the query x key
    mask ``sq`` ``(..., n, n)`` (in each sample): then merging any of them into any other changes nothing the mask
    says, and :func:`thin_uniform` thins it. Compares against the span's first row and column expanded (no copies)."""
    start, length = span
    if length < 2:
        return True
    rows = sq[..., start:start + length, :]
    cols = sq[..., :, start:start + length]
    return (torch.equal(rows, rows[..., :1, :].expand(rows.shape))
            and torch.equal(cols, cols[..., :1].expand(cols.shape)))


def thin_uniform(mask: Tensor, span: tuple[int, int], n: int, k: int) -> Tensor:
    """The query x key mask ``mask`` ``(..., n, n)`` of a uniform ``span`` (:func:`span_is_uniform`) for the tokens
    :func:`merge_span` leaves when ``k`` of the span's tokens survive, whichever they are: rows and columns
    ``[0, start + k)`` and ``[start + length, n)`` -- what :func:`merge_query_key_mask` gives, bit for bit. A view
    (slicing) where the span is the last tokens (OmniGen, Chroma), else one gather."""
    start, length = span
    if not 0 <= k <= length or not 0 <= start <= start + length <= n:
        raise ValueError(f"thin_uniform: span {span} and {k} surviving tokens do not fit {n} tokens")
    if start + length == n:
        return mask[..., :start + k, :start + k]
    idx = torch.cat([torch.arange(start + k, device=mask.device), torch.arange(start + length, n, device=mask.device)])
    return mask[..., idx[:, None], idx]


class SquareMasks:
    """What one model call learned about the query x key mask its blocks share (OmniGen passes every block the same
    tensor): whether its span is uniform (checked once, not in every block) and its thinnings by surviving count.

    Keyed by the mask object itself (a weak reference, compared with ``is``: a tensor's ``==`` is elementwise), its
    version counter (an in-place change is a new mask; inference tensors have none), shape, span and token count: any
    other mask starts afresh. Holds no reference to the mask and keeps only thinnings that are copies (a slice of it is
    as cheap to take again), dropped when the mask is freed (a block's own mask, as Chroma's) or :meth:`clear` is
    called (the model call ends): nothing big outlives the call. Copies and pickles empty."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget the mask."""
        self._ref: weakref.ref | None = None
        self._key: Hashable = None
        self._uniform = False
        self._thinned: dict[int, Tensor] = {}

    def __deepcopy__(self, memo: dict) -> SquareMasks:
        return SquareMasks()

    def __reduce__(self) -> tuple:
        return SquareMasks, ()

    def _freed(self, ref: weakref.ref) -> None:
        if ref is self._ref:
            self.clear()

    def thin(self, mask: Tensor, sq: Tensor, span: tuple[int, int], n: int, k: int) -> Tensor | None:
        """:func:`thin_uniform` of ``mask`` (whose ``(B or 1, n, n)`` view is ``sq``), or ``None`` where its span is not
        uniform (:func:`span_is_uniform`, checked once per mask)."""
        key = (None if mask.is_inference() else mask._version, tuple(mask.shape), span, n)
        if self._ref is None or self._ref() is not mask or self._key != key:
            self.clear()
            self._ref, self._key = weakref.ref(mask, self._freed), key
            self._uniform = span_is_uniform(sq, span)
        if not self._uniform:
            return None
        thinned = self._thinned.get(k)
        if thinned is None:
            thinned = thin_uniform(mask, span, n, k)
            if span[0] + span[1] != n:  # a copy: worth keeping for the next blocks
                self._thinned[k] = thinned
        return thinned


def thin_query_key_mask(mask: Tensor, m: Matching, span: tuple[int, int], n: int,
                        memo: SquareMasks | None = None) -> Tensor | None:
    """:func:`merge_query_key_mask`, bit for bit, cheaply where the span is uniform (:func:`span_is_uniform`: a slice
    of ``mask``, or one gather, whichever tokens ``m`` keeps; ``memo`` remembers the check and the gather for the
    model call's other blocks); otherwise the exact check of each merged pair."""
    b = m.batch_size
    sq = square(mask, b, n)
    if sq is None:
        return None
    k = span[1] - m.num_merged
    if memo is not None:
        thinned = memo.thin(mask, sq, span, n, k)
    else:
        thinned = thin_uniform(mask, span, n, k) if span_is_uniform(sq, span) else None
    if thinned is None:
        return merge_query_key_mask(mask, m, span, n)
    return thinned.expand(b, *thinned.shape[1:])


def keep_rows(table: Tensor, m: Matching, span: tuple[int, int], sample: int = 0) -> Tensor:
    """A per-token table without a batch axis, ``(n, ...)`` (a RoPE table): the rows of the tokens :func:`merge_span`
    leaves -- all but the span's, and the span's kept tokens of ``sample`` -- in order."""
    start, length = span
    return torch.cat([table[:start], table[start:start + length][m.keep[sample]], table[start + length:]], dim=0)
