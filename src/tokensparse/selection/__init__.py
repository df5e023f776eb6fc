"""Token selection: scorers (what is informative) and budgets (how many to keep).

``select(views, keep, selector, generator)`` keeps ``round(keep * n)`` tokens of each reference (the
original behaviour); keyword options choose the other budgets (see :mod:`.budgets`):

    select(views, 0.25, "foreground", g, allocate="score")        # share 25 % on average by score
    select(views, 1.0, "foreground", g, count=12)                  # 12 tokens of each reference
    select(views, 1.0, "foreground", g, adaptive=True, mass=0.9)   # smallest set with 90 % of the mass
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import checks
from . import auto as _auto  # noqa: F401  (registers "auto")
from .auto import FAMILY_SCORER, auto_choice, prompt_family
from .budgets import allocate_mask, count_for_ratio, floor_count, mass_count, topk_mask
from .scorers import INFORMED, NEEDS_PROBE, SCORERS, RefView, Scorer, bayer_rank, register_scorer

ALLOCATIONS = ("auto", "equal", "score")
_RANK_SCORERS = ("detail",)  # content-aware, but scored by pick order (spread_order): no mass to count


def needs_probe(selector: str) -> bool:
    """Whether ``selector`` wants ``RefView.attention`` from a model probe."""
    if selector == "auto":
        return "attention" in FAMILY_SCORER.values()
    return selector in NEEDS_PROBE


def check_adaptive(adaptive: bool, selector: str) -> None:
    """``ValueError`` for an adaptive budget over a selector whose scores carry no mass to count."""
    if adaptive and selector not in INFORMED:
        why = (f"selector {selector!r} ranks tokens in an even-spread pick order, whose scores are ranks, not mass"
               if selector in _RANK_SCORERS else f"selector {selector!r} ranks tokens without regard to content")
        raise ValueError(f"adaptive budgets count score mass, which only informed selectors give "
                         f"({sorted(INFORMED)}); {why}")


def check_views(views: list[RefView]) -> None:
    """``TypeError`` / ``ValueError`` unless ``views`` is a list of :class:`RefView` of one batch size."""
    if not isinstance(views, (list, tuple)):
        raise TypeError(f"views must be a list of RefView (one per reference), got {type(views).__name__}")
    for i, view in enumerate(views):
        if not isinstance(view, RefView):
            raise TypeError(f"views[{i}] must be a RefView, got {type(view).__name__}")
        if view.batch != views[0].batch:
            raise ValueError(f"views[{i}] has a batch of {view.batch}, views[0] of {views[0].batch}: the references "
                             "of one call hold the same samples")


def select(
    views: list[RefView],
    keep: float,
    selector: str,
    generator: torch.Generator,
    *,
    count: int | None = None,
    adaptive: bool = False,
    mass: float = 0.9,
    min_keep: float = 0.0,
    allocate: str = "equal",
) -> Tensor:
    """Keep mask ``(B, N)`` over the concatenation of all references' tokens.

    keep: ratio budget per reference (``count`` overrides it with a token count); with ``adaptive`` it
        is the ceiling; with ``allocate`` sharing, either is the per-reference average.
    min_keep: floor fraction per reference (always at least one token).
    adaptive: each reference keeps the smallest set holding ``mass`` of its score mass (informed scorers).
    allocate: ``"equal"`` (each reference its own budget), ``"score"`` (the references of a sample share
        their summed budget by score: the average is unchanged) or ``"auto"`` (``"score"`` for informed
        scorers, ``"equal"`` for ``random``/``uniform``). Ignored by ``adaptive``.

    ``keep`` and ``mass`` are in ``(0, 1]``, ``min_keep`` in ``[0, 1]``: others are a ``ValueError`` /
    ``TypeError`` naming them, as are ``views`` that are not a list of :class:`RefView` of one batch size.
    """
    checks.choice("selector", selector, SCORERS)
    checks.choice("allocate", allocate, ALLOCATIONS)
    keep = checks.real("keep", keep, 0.0, 1.0, lo_open=True)  # 0 or 1.5 kept 1 token / every token, silently
    min_keep = checks.real("min_keep", min_keep, 0.0, 1.0)
    mass = checks.real("mass", mass, 0.0, 1.0, lo_open=True)
    adaptive = checks.flag("adaptive", adaptive)
    check_adaptive(adaptive, selector)
    if count is not None:
        count = checks.integer("count", count, lo=1)  # every budget keeps at least one token
    check_views(views)
    scores, ties = score_views(views, selector, generator)
    budgets, floors = [], []
    for view in views:
        n = view.grid[0] * view.grid[1]
        budgets.append(min(n, count) if count is not None and n > 0 else count_for_ratio(n, keep))
        floors.append(min(floor_count(n, min_keep), budgets[-1]))
    if adaptive:
        ks = [mass_count(s, mass, lo, hi) for s, lo, hi in zip(scores, floors, budgets)]
        masks = [topk_mask(s, k, t) for s, k, t in zip(scores, ks, ties)]
    else:
        masks = budget_masks(scores, budgets, floors, ties, shares_budget(selector, allocate, len(views)))
    if not masks:
        return torch.zeros(1, 0, dtype=torch.bool)
    return torch.cat(masks, dim=1)


def score_views(views: list[RefView], selector: str, generator: torch.Generator
                ) -> tuple[list[Tensor], list[Tensor]]:
    """Each reference's scores ``(B, n)`` under ``selector``, and its tie-break for equal scores (``(n,)``,
    higher first: the grid's ordered-dither order, so ties spread evenly) — what :func:`select` ranks by.

    A reference with no tokens (a ``0 x w`` grid) scores none, ``(B, 0)``, under every selector (every
    registered scorer guards it: :func:`~.scorers.register_scorer`)."""
    scores = [SCORERS[selector](view, generator) for view in views]
    ties = [(1.0 - bayer_rank(*view.grid)).to(s.device) for view, s in zip(views, scores)]
    return scores, ties


def shares_budget(selector: str, allocate: str, num_refs: int) -> bool:
    """Whether :func:`select` shares the references' budgets by score (``allocate`` resolved for ``selector``)."""
    return num_refs > 1 and (allocate == "score" or (allocate == "auto" and selector in INFORMED))


def budget_masks(scores: list[Tensor], budgets: list[int | Tensor], floors: list[int], ties: list[Tensor],
                 share: bool) -> list[Tensor]:
    """One keep mask ``(B, n_r)`` per reference: each its ``budgets[r]`` best tokens, or (``share``) their
    summed budget shared by score (:func:`allocate_mask`). Budgets are ints or per-row ``(B,)`` tensors.

    This is the non-adaptive half of :func:`select`, for callers that set budgets themselves (the
    trainer's selection-aware dropping draws a budget per sample).
    """
    if share:
        return allocate_mask(scores, budgets, floors, ties)
    return [topk_mask(s, k, t) for s, k, t in zip(scores, budgets, ties)]


__all__ = [
    "ALLOCATIONS", "FAMILY_SCORER", "INFORMED", "SCORERS", "RefView", "Scorer", "allocate_mask", "auto_choice",
    "bayer_rank", "budget_masks", "check_adaptive", "check_views", "count_for_ratio", "floor_count", "mass_count",
    "needs_probe", "prompt_family", "register_scorer", "score_views", "select", "shares_budget", "topk_mask",
]
