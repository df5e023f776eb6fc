"""Sparse Context: turn dense references plus a config into kept reference tokens with their ids."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .selection import ALLOCATIONS, SCORERS, RefView, select
from .tokens import TokenSeq, subset


@dataclass
class SparseContextConfig:
    """How many reference tokens to keep and how to choose them.

    keep: fraction of each reference's tokens kept, in ``(0, 1]``; ``1.0`` is exactly the dense model.
        With several references it is the *average* budget (see ``allocate``); with ``adaptive`` it is
        the ceiling per reference.
    selector: a scorer name from ``tokensparse.selection.SCORERS``: ``"random"``, ``"uniform"``,
        ``"edges"``, ``"foreground"``, ``"attention"`` (a model probe) or ``"auto"`` (per task, from the prompt).
    adaptive: let the budget adapt to the input: each reference keeps the smallest set of tokens that
        holds ``mass`` of its score mass, between ``min_keep`` and ``keep`` of its tokens.
    seed: seeds the selection's own generator, so dense and sparse runs share the diffusion noise.
    cache: compute the kept reference tokens' K/V once per generation and reuse them every step
        (models built with ``ref_attends_target=False`` only).
    count: keep this many tokens per reference instead of a ratio (``keep`` must stay 1.0).
    mass: the score mass an adaptive budget covers, in ``(0, 1]``.
    min_keep: floor fraction per reference, in ``[0, keep]`` (every non-empty reference keeps >= 1 token).
    allocate: how references share the budget: ``"equal"`` (each its own), ``"score"`` (by score, so a
        near-empty reference gives its share to a busy one; the average stays ``keep``) or ``"auto"``
        (``"score"`` for informed scorers, ``"equal"`` for ``random`` / ``uniform``).
    """

    keep: float = 1.0
    selector: str = "random"
    adaptive: bool = False
    seed: int = 0
    cache: bool = False
    count: int | None = None
    mass: float = 0.9
    min_keep: float = 0.0
    allocate: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, numbers.Real):
            raise TypeError(f"keep must be a float in (0, 1], got {type(self.keep).__name__}")
        if not 0.0 < float(self.keep) <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        self.keep = float(self.keep)
        if self.selector not in SCORERS:
            raise ValueError(f"unknown selector {self.selector!r}; choose one of {sorted(SCORERS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        self.seed = int(self.seed)
        if not isinstance(self.cache, bool):
            raise TypeError(f"cache must be a bool, got {type(self.cache).__name__}")
        if not isinstance(self.adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {type(self.adaptive).__name__}")
        if self.count is not None:
            if isinstance(self.count, bool) or not isinstance(self.count, numbers.Integral):
                raise TypeError(f"count must be an int or None, got {type(self.count).__name__}")
            self.count = int(self.count)
            if self.count < 1:
                raise ValueError(f"count must be >= 1, got {self.count}")
            if self.keep != 1.0 or self.adaptive:
                raise ValueError("count sets the budget itself: leave keep at 1.0 and adaptive False")
        for name in ("mass", "min_keep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name} must be a float, got {type(v).__name__}")
            setattr(self, name, float(v))
        if not 0.0 < self.mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {self.mass}")
        if not 0.0 <= self.min_keep <= self.keep:
            raise ValueError(f"min_keep must be in [0, keep={self.keep}], got {self.min_keep}")
        if self.allocate not in ALLOCATIONS:
            raise ValueError(f"unknown allocate {self.allocate!r}; choose one of {list(ALLOCATIONS)}")

    @property
    def is_identity(self) -> bool:
        """True when the config keeps every token: the dense model, exactly (the K/V cache is exact too)."""
        return self.keep == 1.0 and not self.adaptive and self.count is None

    def budget_kwargs(self) -> dict:
        """The budget options of :func:`tokensparse.selection.select` (for integrations that call it)."""
        return {"count": self.count, "adaptive": self.adaptive, "mass": self.mass, "min_keep": self.min_keep,
                    "allocate": self.allocate}


def keep_mask(views: list[RefView], cfg: SparseContextConfig) -> Tensor:
    """Keep mask ``(B, N)`` over the references' dense tokens, with ``cfg``'s own seeded generator."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return select(views, cfg.keep, cfg.selector, gen, **cfg.budget_kwargs())


def sparsify(seq: TokenSeq, views: list[RefView], cfg: SparseContextConfig) -> TokenSeq:
    """Keep the tokens of a dense reference sequence that ``cfg`` selects, ids and all."""
    if cfg.is_identity:
        return seq
    return subset(seq, keep_mask(views, cfg).to(seq.tokens.device))
