"""Token budgets: how many tokens each reference keeps. Pure functions.

Three ways to set the budget of one reference of ``n`` tokens, and one way to share a call's budget:

* fixed ratio  — :func:`count_for_ratio` (``round(keep * n)``);
* fixed count  — ``min(count, n)`` tokens;
* adaptive     — :func:`mass_count`: the smallest set holding a fraction ``mass`` of the reference's score
  mass, within ``[lo, hi]`` (a plain background holds no mass, so a small subject keeps few tokens);
* allocation   — :func:`allocate_mask`: the references of one sample share the sum of their budgets by
  score mass, so a near-empty reference gives its share to a busy one (the average budget is unchanged).

Every budget keeps at least one token of a non-empty reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def count_for_ratio(n: int, keep: float) -> int:
    """Tokens kept out of ``n`` at ratio ``keep``: ``round(keep * n)``, at least 1 for a non-empty grid."""
    if n <= 0:
        return 0
    return min(n, max(1, round(keep * n)))


def floor_count(n: int, frac: float) -> int:
    """The smallest count allowed by a floor fraction ``frac``: ``ceil(frac * n)``, at least 1 (n > 0)."""
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(frac * n - 1e-9)))


def topk_mask(scores: Tensor, k: int | Tensor, tie: Tensor | None = None) -> Tensor:
    """Boolean mask ``(B, n)`` of the ``k`` highest scores per row (``k`` an int or a ``(B,)`` tensor).

    Equal scores are ordered by ``tie`` (``(n,)`` or ``(B, n)``, higher first) when given, then toward
    the lower index, so the result is deterministic.
    """
    b, n = scores.shape
    k_t = torch.as_tensor(k, device=scores.device).expand(b)
    if tie is None:
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    else:  # lexicographic (score, tie): stable sort by tie, then by score
        pre = torch.sort(tie.to(scores.device).float().expand(b, n), dim=1, descending=True, stable=True).indices
        order = pre.gather(1, torch.sort(scores.gather(1, pre), dim=1, descending=True, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=scores.device).expand(b, n).contiguous())
    return rank < k_t.unsqueeze(1)


def mass_count(scores: Tensor, mass: float, lo: int, hi: int) -> Tensor:
    """Per row, the smallest ``k`` whose top-``k`` scores hold ``mass`` of the row's score mass; ``(B,)``.

    Mass is measured above the row's minimum (a constant offset carries no information); a row with no
    mass (all scores equal) keeps ``lo``. The result is clamped to ``[lo, hi]``.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    if scores.shape[1] == 0:  # an empty reference keeps nothing (its min would be a reduction over nothing)
        return torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    s = scores.float()
    s = s - s.min(1, keepdim=True).values
    srt = torch.sort(s, dim=1, descending=True).values
    total = srt.sum(1, keepdim=True)
    frac = srt.cumsum(1) / total.clamp_min(1e-12)
    k = (frac < mass - 1e-6).sum(1) + 1  # first index where the cumulative fraction reaches `mass`
    k = torch.where(total.squeeze(1) > 0, k, torch.full_like(k, lo))
    return k.clamp(lo, hi)


def mass_share(scores: Tensor) -> Tensor:
    """Each token's share of its row's score mass (above the row minimum), ``(B, n)``; 0 for a massless row."""
    if scores.shape[1] == 0:  # an empty reference: no shares (and no minimum to take)
        return scores.float()
    s = scores.float() - scores.float().min(1, keepdim=True).values
    return s / s.sum(1, keepdim=True).clamp_min(1e-12)


def allocate_mask(scores: list[Tensor], budgets: list[int] | list[Tensor], floors: list[int],
                  ties: list[Tensor] | None = None) -> list[Tensor]:
    """Share the references' summed budget by score mass: one keep mask ``(B, n_r)`` per reference.

    Each reference first keeps its ``floors[r]`` best tokens; the rest of the total ``sum(budgets)`` goes
    to the tokens holding the largest *share of their own reference's score mass* (:func:`mass_share`)
    times the reference's token count, over all references: a token's score relative to its reference's
    mean. So neither the scale of each reference's scores (references may even use different scorers) nor
    its size matters: the few tokens of a small subject on a plain background each hold a large share and
    are kept first, its empty background holds none and yields its budget to busier references.
    Each row keeps exactly ``sum(budgets)`` tokens (budgets are ints or per-row ``(B,)`` tensors), at least
    ``floors[r]`` of reference ``r``; ``ties`` as in :func:`topk_mask`.
    """
    if not scores:
        return []
    ties = ties if ties is not None else [None] * len(scores)
    floor_masks = [topk_mask(s, f, t) for s, f, t in zip(scores, floors, ties)]
    big = torch.finfo(torch.float32).max
    n_max = max(1, *(s.shape[1] for s in scores))  # shares times n_r / n_max: equal sizes compare their shares as is
    joint = torch.cat([torch.where(fm, big, mass_share(s) * (s.shape[1] / n_max))
                       for s, fm in zip(scores, floor_masks)], 1)
    b = joint.shape[0]
    tie = None if ties[0] is None else torch.cat([t.float().expand(b, s.shape[1]) for s, t in zip(scores, ties)], 1)
    keep = topk_mask(joint, sum(budgets), tie)
    return list(keep.split([s.shape[1] for s in scores], dim=1))
