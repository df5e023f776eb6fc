"""Sparse Context: turn dense references plus a config into kept reference tokens with their ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .selection import SCORERS, RefView, select
from .tokens import TokenSeq, subset


@dataclass
class SparseContextConfig:
    """How many reference tokens to keep and how to choose them.

    keep: fraction of each reference's tokens kept, in ``(0, 1]``; ``1.0`` is exactly the dense model.
    selector: a scorer name from ``tokensparse.selection.SCORERS`` (``"random"``, ``"uniform"``, ...).
    adaptive: let the budget adapt to the input (``keep`` becomes the average budget).
    seed: seeds the selection's own generator, so dense and sparse runs share the diffusion noise.
    cache: compute the kept reference tokens' K/V once per generation and reuse them every step
        (models built with ``ref_attends_target=False`` only).
    """

    keep: float = 1.0
    selector: str = "random"
    adaptive: bool = False
    seed: int = 0
    cache: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)):
            raise TypeError(f"keep must be a float in (0, 1], got {type(self.keep).__name__}")
        if not 0.0 < float(self.keep) <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        self.keep = float(self.keep)
        if self.selector not in SCORERS:
            raise ValueError(f"unknown selector {self.selector!r}; choose one of {sorted(SCORERS)}")
        if not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")

    @property
    def is_identity(self) -> bool:
        """True when the config keeps every token: the dense model, exactly (the K/V cache is exact too)."""
        return self.keep == 1.0 and not self.adaptive


def sparsify(seq: TokenSeq, views: list[RefView], cfg: SparseContextConfig) -> TokenSeq:
    """Keep the tokens of a dense reference sequence that ``cfg`` selects, ids and all."""
    if cfg.is_identity:
        return seq
    gen = torch.Generator().manual_seed(cfg.seed)
    keep = select(views, cfg.keep, cfg.selector, gen)
    return subset(seq, keep.to(seq.tokens.device))
