"""Sparse Context: turn dense references plus a config into kept reference tokens with their ids."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import checks
from .selection import ALLOCATIONS, SCORERS, RefView, check_adaptive, select
from .tokens import TokenSeq, ref_slices, stand_in_sizes, subset

MAX_COUNT = 2**24
"""Largest ``SparseContextConfig.count``: 16,777,216 tokens, as many as an 8192 x 8192 image (the largest side the
CLI reads) cut into 2 x 2-pixel tokens, far more than any reference a transformer can attend to holds. A larger
count (``10**30``) is a ``ValueError``: it was accepted and, on diffusers, silently kept every token."""


@dataclass
class SparseContextConfig:
    """How many reference tokens to keep and how to choose them.

    keep: fraction of each reference's tokens kept, in ``(0, 1]``; ``1.0`` is exactly the dense model.
        A reference of ``n`` tokens keeps ``round(keep * n)`` of them (Python's ``round``: halves to even),
        at least 1, so a ``keep`` just below 1 may round to all ``n`` on a small grid.
        With several references it is the *average* budget (see ``allocate``); with ``adaptive`` it is
        the ceiling per reference.
    selector: a scorer name from ``tokensparse.selection.SCORERS``: ``"random"``, ``"uniform"``,
        ``"edges"``, ``"foreground"``, ``"detail"``, ``"attention"`` (a model probe) or ``"auto"`` (per task,
        from the prompt).
    adaptive: let the budget adapt to the input: each reference keeps the smallest set of tokens that
        holds ``mass`` of its score mass, between ``min_keep`` and ``keep`` of its tokens (informed selectors
        only: ``edges``, ``foreground``, ``attention``, ``auto``). ``auto`` scores an edit with ``uniform``, whose
        scores carry no content: there the budget is a fixed fraction (44 of 64 tokens at mass 0.9), not adapted.
    seed: seeds the selection's own generator, so dense and sparse runs share the diffusion noise. ``"random"``
        draws for the whole batch at once, reference after reference: a sample's random selection depends on its
        place in the batch and on the batch size (never on the other samples' images); every other selector
        scores each sample on its own, from its own references and prompt.
    cache: compute the kept reference tokens' K/V once per generation and reuse them every step
        (models built with ``ref_attends_target=False`` only).
    count: keep this many tokens per reference instead of a ratio (``keep`` must stay 1.0). Like ``keep``,
        with several references that share their budget (``allocate``) it is the per-reference *average*
        (the sample keeps ``count`` times its number of references); ``allocate="equal"``: exactly ``count``
        each. An int in ``[1, MAX_COUNT]`` (2**24; a larger one is a ``ValueError`` here). A reference with
        fewer tokens keeps all of them (``min(count, n)``: diffusers references differ in size, so a count may
        exceed some of them); on a RefDiT, whose references all hold ``config.grid ** 2`` tokens, a count of at
        least that many drops nothing anywhere and is refused at apply (a ``ValueError``, as ``keep`` above 1).
    mass: the score mass an adaptive budget covers, in ``(0, 1]``.
    min_keep: floor fraction per reference, in ``[0, keep]`` (every non-empty reference keeps >= 1 token).
    allocate: how references share the budget: ``"equal"`` (each its own), ``"score"`` (by score, so a
        near-empty reference gives its share to a busy one; the average stays ``keep``) or ``"auto"``
        (``"score"`` for informed scorers, ``"equal"`` for ``random`` / ``uniform``). Adaptive budgets are per
        reference (as ``"equal"``): ``"score"`` with ``adaptive`` is a ``ValueError``.
    proportional: each dropped token hands its attention mass to the kept token of its reference nearest to
        it (scorer features: patch pixels for RefDiT, VAE latent tokens for diffusers): a kept token standing for
        ``s`` tokens gets ``log(s)`` added to its attention logits in every layer
        (:func:`tokensparse.tokens.stand_in_sizes`), exactly what ``s`` copies of it at its position would get.
        Training-free, the same token count and FLOPs. RefDiT, and the diffusers FLUX.2 (Klein, dev, Klein
        inpaint) and FLUX.1 Kontext pipelines (an additive ``attention_mask``: SDPA-family, ``flex`` or
        ``xformers`` attention backends; on GPU SDPA may take a slower kernel with a mask). Refused with
        ``Flux2KleinKVPipeline`` / ``cache=True`` on diffusers and for Qwen-Image-Edit (their attention takes no
        float bias: :mod:`tokensparse.integrations.diffusers_proportional`). Measured on RefDiT: it helps random
        selection and ``auto`` at 25-50 %, but hurts subject references where an informed selector keeps little
        more than the subject (keep 0.1, adaptive budgets: the background's mass lands on a few subject tokens).
        Off by default.
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
    proportional: bool = False

    def __post_init__(self) -> None:
        self.keep = checks.real("keep", self.keep, 0.0, 1.0, lo_open=True)
        checks.choice("selector", self.selector, SCORERS)
        self.seed = checks.seed("seed", self.seed)
        self.cache = checks.flag("cache", self.cache)
        self.adaptive = checks.flag("adaptive", self.adaptive)
        check_adaptive(self.adaptive, self.selector)
        if self.count is not None:
            self.count = checks.integer("count", self.count, lo=1, hi=MAX_COUNT)  # 10**30 was accepted
            if self.keep != 1.0 or self.adaptive:
                raise ValueError("count sets the budget itself: leave keep at 1.0 and adaptive False")
        self.mass = checks.real("mass", self.mass, 0.0, 1.0, lo_open=True)
        self.min_keep = checks.real("min_keep", self.min_keep, 0.0, self.keep)
        checks.choice("allocate", self.allocate, ALLOCATIONS)
        if self.adaptive and self.allocate == "score":
            raise ValueError("allocate='score' shares a fixed budget across references; an adaptive budget is set per "
                             "reference by its score mass: leave allocate at 'auto' with adaptive=True")
        self.proportional = checks.flag("proportional", self.proportional)

    @property
    def is_identity(self) -> bool:
        """True when the config keeps every token: the dense model, exactly (the K/V cache is exact too)."""
        return self.keep == 1.0 and not self.adaptive and self.count is None

    def budget_kwargs(self) -> dict:
        """The budget options of :func:`tokensparse.selection.select` (for integrations that call it)."""
        return {"count": self.count, "adaptive": self.adaptive, "mass": self.mass, "min_keep": self.min_keep,
                    "allocate": self.allocate}


def checked(cfg: SparseContextConfig) -> SparseContextConfig:
    """``cfg`` checked again as its constructor checks it (a field edited after construction: ``keep = 1.5``), as a
    copy; ``TypeError`` for anything but a :class:`SparseContextConfig`."""
    if not isinstance(cfg, SparseContextConfig):
        raise TypeError(f"cfg must be a SparseContextConfig, got {type(cfg).__name__}")
    return replace(cfg)


def keep_mask(views: list[RefView], cfg: SparseContextConfig, generator: torch.Generator | None = None) -> Tensor:
    """Keep mask ``(B, N)`` over the references' dense tokens, with ``cfg``'s own seeded generator (``generator``:
    draw on from that one instead, for references selected one call at a time, as GLM-Image's)."""
    return _mask(views, checked(cfg), generator)


def _mask(views: list[RefView], cfg: SparseContextConfig, generator: torch.Generator | None) -> Tensor:
    """:func:`keep_mask` of a ``cfg`` already checked."""
    gen = torch.Generator().manual_seed(cfg.seed) if generator is None else generator
    return select(views, cfg.keep, cfg.selector, gen, **cfg.budget_kwargs())


def sparsify(seq: TokenSeq, views: list[RefView], cfg: SparseContextConfig) -> TokenSeq:
    """Keep the tokens of a dense reference sequence that ``cfg`` selects, ids and all."""
    cfg = checked(cfg)
    if cfg.is_identity:
        return seq
    keep = _mask(views, cfg, None).to(seq.tokens.device)  # cfg checked above
    if cfg.proportional:
        seq = replace(seq, sizes=reference_sizes(views, keep))
    return subset(seq, keep)


def reference_sizes(views: list[RefView], keep: Tensor) -> Tensor:
    """How many dense tokens each reference token stands for, ``(B, N)`` over the references' tokens in ``views``
    order (row-major each) like ``keep (B, N)``: kept ones ``1 +`` the dropped tokens of their reference nearest
    to them in its ``features`` (:func:`~tokensparse.tokens.stand_in_sizes`), dropped ones 0."""
    slices = ref_slices(tuple(v.grid for v in views))
    n = slices[-1].stop if slices else 0
    if not isinstance(keep, Tensor) or keep.dim() != 2 or keep.shape[1] != n:
        got = tuple(keep.shape) if isinstance(keep, Tensor) else type(keep).__name__
        raise ValueError(f"keep must be a (B, N) mask over the views' {n} tokens, got {got}")
    return torch.cat([stand_in_sizes(v.features.reshape(v.batch, -1, v.features.shape[-1]).to(keep.device),
                                     keep[:, sl]) for v, sl in zip(views, slices)], 1)
