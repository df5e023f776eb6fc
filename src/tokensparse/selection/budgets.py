"""Token budgets: how many tokens each reference keeps. Pure functions."""

from __future__ import annotations

import torch
from torch import Tensor


def count_for_ratio(n: int, keep: float) -> int:
    """Tokens kept out of ``n`` at ratio ``keep``: ``round(keep * n)``, at least 1 for a non-empty grid."""
    if n <= 0:
        return 0
    return min(n, max(1, int(round(keep * n))))


def topk_mask(scores: Tensor, k: int | Tensor) -> Tensor:
    """Boolean mask ``(B, n)`` of the ``k`` highest scores per row (``k`` an int or a ``(B,)`` tensor).

    Ties break toward the lower index, so the result is deterministic.
    """
    b, n = scores.shape
    k_t = torch.as_tensor(k, device=scores.device).expand(b)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=scores.device).expand(b, n).contiguous())
    return rank < k_t.unsqueeze(1)
