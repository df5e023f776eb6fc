"""Bipartite soft matching: random destinations (one per 2x2 cell), each source's most similar destination, the
``r`` best merged (ToMe) or those above a threshold (CA-ToMe), as a :class:`~.matching.Matching`; and
:func:`bipartite_soft_matching`, ToMe's ``(merge, unmerge)`` in one call. Pure primitives, no model knowledge."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .. import checks
from .config import TokenMergingConfig
from .matching import Matching


def random_destinations(h: int, w: int, generator: torch.Generator | None = None,
                        cell: tuple[int, int] = (2, 2)) -> Tensor:
    """Boolean mask ``(h*w,)`` over a row-major grid: one random destination per ``cell``; True = destination.

    Tokens in the partial cells at the bottom / right edge are destinations (never merged). ``h``, ``w``: ints
    ``>= 0``; ``cell``: a pair of ints ``>= 1``; ``TypeError`` / ``ValueError`` naming the argument otherwise.
    """
    h, w = checks.integer("h", h, lo=0), checks.integer("w", w, lo=0)
    sy, sx = _pair("cell", cell, lo=1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    hc, wc = h // sy, w // sx
    is_dst = torch.ones(h, w, dtype=torch.bool)
    if hc and wc:
        pick = torch.randint(sy * sx, (hc, wc), generator=generator)                # (hc, wc)
        cells = torch.zeros(hc, wc, sy * sx, dtype=torch.bool)
        cells.scatter_(2, pick[..., None], True)
        cells = cells.reshape(hc, wc, sy, sx).permute(0, 2, 1, 3).reshape(hc * sy, wc * sx)
        is_dst[: hc * sy, : wc * sx] = cells
    return is_dst.reshape(-1)


def num_sources(h: int, w: int, cell: tuple[int, int] = (2, 2)) -> int:
    """How many sources (False) every :func:`random_destinations` mask of an ``h x w`` grid holds, whatever it draws:
    each whole ``cell`` has one destination, the partial cells at the edges none but destinations. Arithmetic (the
    token mergers needed the count at every step and layer, and counted the mask: three ops and a host read)."""
    sy, sx = cell
    return (h // sy) * (w // sx) * (sy * sx - 1)


def match(metric: Tensor, is_dst: Tensor, *, num: int | None = None, threshold: float | None = None,
          cap: int | None = None, center: bool = False) -> Matching:
    """Bipartite soft matching of ``metric`` ``(B, N, C)`` with destinations ``is_dst``, a bool ``(N,)`` (True =
    destination).

    Exactly one of ``num`` (merge this many sources, ToMe) and ``threshold`` (merge sources whose best
    cosine similarity is ``>= threshold``, the minimum count over the batch, CA-ToMe) is given; ``cap`` bounds
    the adaptive count. ``center``: cosine similarity of the tokens minus their sequence's mean token (two
    tokens both equal to the mean, e.g. in a constant sequence, have similarity 1).
    Ties are broken by position (stable sort), so results are deterministic.
    """
    if (num is None) == (threshold is None):
        raise ValueError("give exactly one of num and threshold")
    if metric.ndim != 3:
        raise ValueError(f"metric must be (B, N, C), got shape {tuple(metric.shape)}")
    b, n, _ = metric.shape
    if not isinstance(is_dst, Tensor) or is_dst.dtype != torch.bool:  # ~ of 0/1 ints is -1/-2: every token a source
        got = is_dst.dtype if isinstance(is_dst, Tensor) else type(is_dst).__name__
        raise TypeError(f"is_dst must be a bool tensor (True = destination, as random_destinations gives), got {got}")
    if is_dst.shape != (n,):
        raise ValueError(f"is_dst must have shape ({n},), got {tuple(is_dst.shape)}")
    src_pos, dst_pos = destination_positions(is_dst.to(metric.device))
    return match_positions(metric, src_pos, dst_pos, num=num, threshold=threshold, cap=cap, center=center)


def destination_positions(is_dst: Tensor) -> tuple[Tensor, Tensor]:
    """``(src_pos, dst_pos)``: the ascending positions of the sources (False) and destinations (True) of a mask
    from :func:`random_destinations`, as :func:`match_positions` takes them (worth keeping where a mask is reused)."""
    return (~is_dst).nonzero().squeeze(1), is_dst.nonzero().squeeze(1)


def match_positions(metric: Tensor, src_pos: Tensor, dst_pos: Tensor, *, num: int | None = None,
                    threshold: float | None = None, cap: int | None = None, center: bool = False) -> Matching:
    """:func:`match` with the destinations given as positions: ``src_pos`` and ``dst_pos``, int64 on ``metric``'s
    device, ascending, together every position ``0 .. N-1`` once (:func:`destination_positions` of the mask).

    The work of a matching, unchecked: the token mergers call it for every layer at every step, where a few
    microseconds per op add up (they cache the positions per step and layer, and ``match`` computes them). Fewer
    ops than the plain formulation with the same results, bit for bit: each norm is computed once (centring's
    and the normalisation's), index tensors are made in place, and a batch of one needs no row offsets.
    """
    b, n = metric.shape[0], metric.shape[1]
    device = metric.device
    n_src = src_pos.numel()
    limit = n_src if cap is None else max(0, min(cap, n_src))
    if n_src == 0 or dst_pos.numel() == 0 or (num is not None and num <= 0) or limit == 0:
        r = 0
    else:
        with torch.no_grad():
            m = metric if metric.dtype in (torch.float32, torch.float64) else metric.float()  # fp16/bf16: in fp32
            at_mean = None
            if center:  # a token equal to its sequence's mean centres to zero: two such tokens are identical
                c = m - m.mean(1, keepdim=True)
                norm = torch.linalg.vector_norm(c, dim=-1, keepdim=True)           # (B, N, 1)
                at_mean = norm <= 1e-5 * torch.linalg.vector_norm(m, dim=-1, keepdim=True)
                m = c
            else:
                norm = torch.linalg.vector_norm(m, dim=-1, keepdim=True)
            m = m / norm.clamp_min(1e-6)  # F.normalize(m, dim=-1, eps=1e-6), whose norm is the one above
            scores = m.index_select(1, src_pos) @ m.index_select(1, dst_pos).transpose(1, 2)  # (B, Ns, Nd)
            if at_mean is not None and bool(at_mean.any()):
                at_mean = at_mean.squeeze(-1)                                      # (B, N)
                both = at_mean.index_select(1, src_pos)[:, :, None] & at_mean.index_select(1, dst_pos)[:, None]
                scores = scores.masked_fill(both, 1.0)
            best, best_dst = scores.max(dim=-1)                                    # (B, Ns)
        if num is not None:
            r = min(num, n_src)
        else:
            r = min(int((best >= threshold).sum(dim=-1).min()), limit)

    if r == 0:
        keep = torch.arange(n, device=device).repeat(b, 1)
        return Matching(keep=keep, src=keep[:, :0], slot=keep[:, :0], index=keep,
                        counts=torch.ones(b, n, device=device, dtype=metric.dtype if metric.is_floating_point()
                                          else torch.float32))

    merged_local = best.argsort(dim=-1, descending=True, stable=True)[:, :r]      # (B, r), ties by position
    src = src_pos.take(merged_local)                                               # (B, r)
    dst_of_src = dst_pos.take(best_dst.gather(1, merged_local))                    # (B, r)
    kept = torch.ones(b, n, dtype=torch.bool, device=device).scatter_(1, src, False)  # (B, N)
    mk = n - r
    keep = kept.nonzero()[:, 1].reshape(b, mk)                                     # (B, M), ascending
    index = kept.cumsum(1).sub_(1)                                                 # slot of each kept token
    slot = index.gather(1, dst_of_src)
    index.scatter_(1, src, slot)
    counts = torch.ones(b, mk, device=device, dtype=metric.dtype)
    counts.scatter_add_(1, slot, torch.ones(b, r, device=device, dtype=metric.dtype))
    return Matching(keep=keep, src=src, slot=slot, index=index, counts=counts)


def bipartite_soft_matching(metric: Tensor, grid: tuple[int, int], *, ratio: float = 0.0,
                            threshold: float | None = None, generator: torch.Generator | None = None,
                            cell: tuple[int, int] = (2, 2), center: bool = False,
                            ) -> tuple[Callable[..., Tensor], Callable[[Tensor], Tensor]]:
    """ToMe in one call: ``(merge, unmerge)`` for tokens ``metric`` ``(B, h*w, C)`` on ``grid = (h, w)``.

    ``ratio`` merges ``int(ratio * N)`` tokens; with ``threshold`` set, merges adaptively (``ratio`` > 0 caps).
    ``center`` defaults to the raw cosine of ToMe here (``TokenMergingConfig``, used by the hooks, centres by
    default). Destinations are drawn with ``generator`` (the global RNG when ``None``). ``ratio``,
    ``threshold`` and ``center`` are checked as :class:`TokenMergingConfig` checks them; ``grid`` and ``cell``
    must be pairs of ints (``grid`` sides >= 0, ``cell`` sides >= 1).
    """
    TokenMergingConfig(ratio=ratio, threshold=threshold, center=center)  # validates, names the bad argument
    if metric.ndim != 3:
        raise ValueError(f"metric must be (B, N, C), got shape {tuple(metric.shape)}")
    h, w = _pair("grid", grid, lo=0)  # cell and generator: checked by random_destinations
    n = metric.shape[1]
    if h * w != n:
        raise ValueError(f"grid {grid} has {h * w} tokens, metric has {n}")
    is_dst = random_destinations(h, w, generator, cell)
    n_src = num_sources(h, w, cell)
    if threshold is None:
        m = match(metric, is_dst, num=int(n * ratio), center=center)
    else:
        m = match(metric, is_dst, threshold=threshold, cap=int(n * ratio) if ratio > 0 else n_src, center=center)
    return m.merge, m.unmerge


def _pair(name: str, value: object, lo: int) -> tuple[int, int]:
    """``value`` as two ints ``>= lo`` (a grid or cell ``(h, w)``); errors name ``name``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or len(value := tuple(value)) != 2:
        raise TypeError(f"{name} must be a pair of ints (h, w), got {value!r:.80}")
    return checks.integer(f"{name}[0]", value[0], lo=lo), checks.integer(f"{name}[1]", value[1], lo=lo)
