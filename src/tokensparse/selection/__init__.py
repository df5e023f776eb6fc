"""Token selection: scorers (what is informative) and budgets (how many to keep)."""

from __future__ import annotations

import torch
from torch import Tensor

from .budgets import count_for_ratio, topk_mask
from .scorers import SCORERS, RefView, Scorer, bayer_rank, register_scorer


def select(views: list[RefView], keep: float, selector: str, generator: torch.Generator) -> Tensor:
    """Keep mask ``(B, N)`` over the concatenation of all references' tokens.

    Each reference keeps ``count_for_ratio(h*w, keep)`` tokens, chosen by the named scorer.
    """
    if selector not in SCORERS:
        raise ValueError(f"unknown selector {selector!r}; choose one of {sorted(SCORERS)}")
    masks = []
    for view in views:
        h, w = view.grid
        scores = SCORERS[selector](view, generator)
        masks.append(topk_mask(scores, count_for_ratio(h * w, keep)))
    return torch.cat(masks, dim=1)


__all__ = ["SCORERS", "RefView", "Scorer", "bayer_rank", "count_for_ratio", "register_scorer", "select", "topk_mask"]
