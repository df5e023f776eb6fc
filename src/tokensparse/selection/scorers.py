"""Token scorers: which reference tokens are informative. Pure functions, no model knowledge.

A scorer maps one reference, seen as a :class:`RefView`, to a score per token ``(B, h*w)``; the
budget then keeps the highest-scoring tokens. Scorers register themselves by name in ``SCORERS``,
which is also the list of valid ``SparseContextConfig.selector`` values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class RefView:
    """One reference as scorers see it.

    features: ``(B, h, w, C)`` per-token features (raw patch pixels for RefDiT, VAE latents for diffusers).
    image: ``(B, 3, H, W)`` in ``[0, 1]`` when the pixels are at hand, else ``None``.
    index: position of the reference (0-based) among the references of the call.
    prompts: the prompts of the batch, when known.
    """

    features: Tensor
    image: Tensor | None = None
    index: int = 0
    prompts: list[str] | None = None

    @property
    def batch(self) -> int:
        return self.features.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.features.shape[1], self.features.shape[2]


Scorer = Callable[[RefView, torch.Generator], Tensor]
SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Decorator: make ``fn`` available as ``selector=name``."""

    def deco(fn: Scorer) -> Scorer:
        SCORERS[name] = fn
        return fn

    return deco


@register_scorer("random")
def score_random(view: RefView, generator: torch.Generator) -> Tensor:
    """I.i.d. uniform scores: top-k is a uniformly random subset (the fine-tuning distribution)."""
    h, w = view.grid
    return torch.rand(view.batch, h * w, generator=generator).to(view.features.device)


def bayer_rank(h: int, w: int) -> Tensor:
    """Ordered-dither rank of each cell of an ``h x w`` grid, ``(h*w,)`` in ``[0, 1)``.

    Cells with low rank are spread evenly over the grid at every prefix length, so keeping the ``k``
    lowest-ranked cells gives a near-uniform subsample for any ``k`` (not only 1/4, 1/16, ...).
    """
    n = 1
    while n < max(h, w):
        n *= 2
    m = torch.zeros(1, 1, dtype=torch.long)
    while m.shape[0] < n:  # Bayer recursion: M_2n = [[4M, 4M+2], [4M+3, 4M+1]]
        m = torch.cat([torch.cat([4 * m, 4 * m + 2], 1), torch.cat([4 * m + 3, 4 * m + 1], 1)], 0)
    return m[:h, :w].reshape(-1).double().argsort().argsort().float() / (h * w)


@register_scorer("uniform")
def score_uniform(view: RefView, generator: torch.Generator) -> Tensor:
    """A spatially even subset (ordered dithering); deterministic, ignores the generator."""
    h, w = view.grid
    return (1.0 - bayer_rank(h, w)).to(view.features.device).expand(view.batch, -1).clone()
