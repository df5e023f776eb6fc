"""Pure token bookkeeping: position ids, keep masks, gather / scatter with padding.

Every reference image becomes a grid of ``h x w`` tokens. A batch of references is one concatenated
sequence of ``N = sum_r h_r * w_r`` tokens per sample, each carrying a position id
``(ref_index, row, col)`` (``ref_index`` starts at 1; the target uses 0, like FLUX's reference offset).
A *sparse* reference is a subset of that sequence with the same ids, so RoPE still places every kept
token where it came from. Subsets are given as boolean keep masks ``(B, N)``; counts may differ between
references and between samples, in which case the packed result is right-padded and carries ``valid``.

Nothing here knows about models.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


def grid_ids(index: int, h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids ``(h*w, 3)`` = (index, row, col) for one token grid, row-major."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack([torch.full_like(rows, index), rows, cols], dim=-1)


@dataclass
class TokenSeq:
    """A batch of (possibly sparse, possibly padded) token sequences with their position ids.

    tokens: ``(B, N, D)``; ids: ``(B, N, 3)`` int64; valid: ``(B, N)`` bool or ``None`` (= all valid).
    grids: the dense grid shape ``(h, w)`` of each reference index 1..R, for scorers and scatter.
    sizes: ``(B, N)`` float, how many dense tokens each token stands for (:func:`stand_in_sizes`; attention
        adds ``log(size)`` to its logits), or ``None`` (= one each: plain attention).
    """

    tokens: Tensor
    ids: Tensor
    valid: Tensor | None
    grids: tuple[tuple[int, int], ...]
    sizes: Tensor | None = None

    @property
    def num_refs(self) -> int:
        return len(self.grids)

    @property
    def dense_len(self) -> int:
        return sum(h * w for h, w in self.grids)

    def counts(self) -> Tensor:
        """Number of valid tokens per sample, ``(B,)``."""
        if self.valid is None:
            return torch.full((self.tokens.shape[0],), self.tokens.shape[1], dtype=torch.long)
        return self.valid.sum(1)

    def with_tokens(self, tokens: Tensor) -> TokenSeq:
        return replace(self, tokens=tokens)

    def kept_grids(self, b: int = 0) -> list[Tensor]:
        """Which dense positions sample ``b`` holds: one bool mask ``(h, w)`` per reference (from the ids)."""
        ids = self.ids[b] if self.valid is None else self.ids[b][self.valid[b]]
        masks = [torch.zeros(h, w, dtype=torch.bool) for h, w in self.grids]
        for ref, row, col in ids.tolist():
            masks[ref - 1][row, col] = True
        return masks


def dense_seq(grids: list[Tensor]) -> TokenSeq:
    """Concatenate per-reference token grids ``(B, h, w, D)`` into one dense :class:`TokenSeq`."""
    if not grids:
        raise ValueError("dense_seq needs at least one reference grid")
    b, d = grids[0].shape[0], grids[0].shape[-1]
    toks, ids, shapes = [], [], []
    for i, g in enumerate(grids):
        if g.dim() != 4 or g.shape[0] != b or g.shape[-1] != d:
            raise ValueError(f"reference grid {i} has shape {tuple(g.shape)}; expected (B={b}, h, w, D={d})")
        h, w = g.shape[1], g.shape[2]
        toks.append(g.reshape(b, h * w, d))
        ids.append(grid_ids(i + 1, h, w, device=g.device))
        shapes.append((h, w))
    ids_all = torch.cat(ids).unsqueeze(0).expand(b, -1, -1)
    return TokenSeq(torch.cat(toks, 1), ids_all, None, tuple(shapes))


def ref_slices(grids: tuple[tuple[int, int], ...]) -> list[slice]:
    """Slices of each reference inside the dense sequence."""
    out, start = [], 0
    for h, w in grids:
        out.append(slice(start, start + h * w))
        start += h * w
    return out


def pack_index(keep: Tensor) -> tuple[Tensor, Tensor | None]:
    """Turn a keep mask ``(B, N)`` into a sorted gather index ``(B, K)`` and ``valid`` ``(B, K)``.

    ``K`` is the largest per-sample count. ``valid`` is ``None`` when every sample keeps the same count
    (no padding needed: the fast path). Padding slots point at index 0 and are marked invalid.
    """
    if keep.dtype != torch.bool or keep.dim() != 2:
        raise ValueError(f"keep must be a (B, N) bool mask, got {keep.dtype} {tuple(keep.shape)}")
    counts = keep.sum(1)
    k = int(counts.max()) if keep.numel() else 0
    n = keep.shape[1]
    pos = torch.arange(n, device=keep.device).expand_as(keep)
    # kept positions first (in order), dropped after: sort by (not kept, position)
    order = torch.argsort((~keep).long() * n + pos, dim=1)[:, :k]
    if bool((counts == k).all()):
        return order, None
    valid = torch.arange(k, device=keep.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(valid, order, torch.zeros_like(order)), valid


def gather(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, k]]`` for ``x`` of shape ``(B, N, ...)`` and ``index`` ``(B, K)``."""
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)


def scatter(y: Tensor, index: Tensor, valid: Tensor | None, n: int, fill: float = 0.0) -> Tensor:
    """Inverse of :func:`gather`: place ``y (B, K, ...)`` at ``index`` in a ``(B, n, ...)`` tensor of ``fill``.

    Padding slots (``valid`` False) are ignored.
    """
    out = y.new_full((y.shape[0], n, *y.shape[2:]), fill)
    if valid is None:
        idx = index.reshape(*index.shape, *([1] * (y.dim() - 2))).expand_as(y)
        return out.scatter(1, idx, y)
    rows = torch.arange(y.shape[0], device=y.device).unsqueeze(1).expand_as(index)
    out[rows[valid], index[valid]] = y[valid]
    return out


def subset(seq: TokenSeq, keep: Tensor) -> TokenSeq:
    """Keep the tokens of a sequence where ``keep (B, N)`` is True (padding is never kept), ids and ``sizes``
    too (the sizes of tokens dropped here are dropped with them, not handed on: :func:`stand_in_sizes` does
    that)."""
    if keep.shape != seq.tokens.shape[:2]:  # checked first: a padded sequence's valid mask would broadcast
        raise ValueError(f"keep mask {tuple(keep.shape)} does not match sequence {tuple(seq.tokens.shape[:2])}")
    if seq.valid is not None:
        keep = keep & seq.valid
    index, valid = pack_index(keep)
    sizes = None if seq.sizes is None else gather(seq.sizes, index)
    return TokenSeq(gather(seq.tokens, index), gather(seq.ids, index), valid, seq.grids, sizes)


CDIST_ELEMENTS = 1 << 24
"""Most distances :func:`stand_in_sizes` holds at once (64 MB of float32): it computes them in blocks of rows."""


def stand_in_sizes(features: Tensor, keep: Tensor) -> Tensor:
    """How many tokens each kept token stands for once the others are dropped: ``(B, N)`` float.

    ``features (B, N, C)`` of one reference's dense tokens and its keep mask ``(B, N)``. Every dropped token is
    assigned to the kept token of its sample nearest to it (L2 over ``features``; ties to the first); a kept
    token's size is 1 plus the number assigned to it, a dropped token's 0, and each sample's sizes sum to
    ``N`` (``0`` everywhere for a sample that keeps nothing). Adding ``log(size)`` to a kept token's attention
    logits gives it the attention mass its stand-ins had when they are alike (ToMe's proportional attention,
    for dropped instead of merged tokens).
    """
    if keep.dtype != torch.bool or keep.shape != features.shape[:2] or features.dim() != 3:
        raise ValueError(f"features must be (B, N, C) and keep a (B, N) bool mask, got {tuple(features.shape)} "
                         f"and {keep.dtype} {tuple(keep.shape)}")
    f = features.float()
    b, n = keep.shape
    owner = torch.empty(b, n, dtype=torch.long, device=keep.device)
    rows = max(1, CDIST_ELEMENTS // max(1, b * n))  # distances in row blocks: a 2048^2 FLUX.2 reference has 16k tokens
    for start in range(0, n, rows):
        dist = torch.cdist(f[:, start:start + rows], f).masked_fill_(~keep[:, None, :], float("inf"))  # to kept only
        owner[:, start:start + rows] = dist.argmin(-1)
    owner = torch.where(keep, torch.arange(n, device=keep.device), owner)  # a kept token is its own
    sizes = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device)
    sizes.scatter_add_(1, owner, torch.ones_like(sizes))
    return sizes * keep.any(1, keepdim=True)
