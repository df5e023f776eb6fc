"""Guidance for (token-sparse) denoisers: CFG, Sparse Guidance, CFG+SG — one sampler-facing function.

A *branch* is one denoiser pass: a condition (the prompt, or the null prompt ``""``), a routing rate
``gamma`` (fraction of target tokens routed around the middle blocks, TREAD) and optionally a sparser
reference. Every rule is a weighted sum of two branches (Sparse Guidance, arXiv 2601.01608, eq. for D_SG):

    CFG      D = w * D(c; 0)        + (1 - w) * D(null; 0)
    SG       D = w * D(c; g_strong) + (1 - w) * D(c; g_weak)          both branches conditional
    CFG+SG   D = w * D(c; g_strong) + (1 - w) * D(null; g_weak)       (null_weak=True)

``weak_keep`` additionally gives the weak branch a heavily dropped reference (sparse-reference guidance).
Outside ``interval`` (times ``lo <= t <= hi`` in [0, 1], bounds compared in t's dtype) only the first branch
runs; a batch whose samples' times straddle a bound is guided per sample. Plain SG's branches share their
condition, context and input, so a denoiser may compute what they have in common once (RefDiT: the blocks
before the route span); CFG's, CFG+SG's and sparse-reference SG's branches differ from the first block on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import checks


@dataclass(frozen=True)
class Branch:
    """One denoiser pass: conditional or null prompt, routing rate, reference keep (1.0 = as configured)."""

    cond: bool
    gamma: float = 0.0
    ref_keep: float = 1.0


BranchDenoiser = Callable[[Tensor, Tensor, tuple[Branch, ...]], list[Tensor]]
"""``denoise(x, t, branches)``: one output per branch, all at the same ``(x, t)`` (so an implementation may
share work between branches, e.g. RefDiT's blocks before the route span when two branches differ only in
routing)."""


MAX_SCALE = 1000.0
"""Largest guidance scale magnitude accepted: far beyond any useful scale (tens at most), and well below
the float32 range that ``scale * (d1 - d2)`` compounded over the steps overflows into NaN images."""


def _check_scale(value: object) -> float:
    return checks.real("scale", value, -MAX_SCALE, MAX_SCALE)


@dataclass
class CFGConfig:
    """Classifier-free guidance with scale ``scale`` (1.0 = unguided conditional; ``|scale| <= 1000``).

    interval: ``(lo, hi)`` with ``0 <= lo < hi <= 1``: guide only at times ``lo <= t <= hi`` (1 = noise, both
        bounds included) and run the conditional pass alone elsewhere; ``None`` = every step. A one-point interval
        (``lo == hi``) is refused: it would guide only a step whose time equals it exactly in t's dtype.
    """

    scale: float = 1.5
    interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        self.scale = _check_scale(self.scale)
        self.interval = _check_interval(self.interval)

    def branches(self) -> tuple[Branch, Branch]:
        return Branch(cond=True), Branch(cond=False)


@dataclass
class SparseGuidanceConfig:
    """Sparse Guidance: ``scale * D(c; strong) + (1 - scale) * D(c or null; weak)`` (``|scale| <= 1000``).

    strong, weak: routing rates with ``0 <= strong <= weak < 1``; the weak branch must be weaker, by routing
        more (``strong < weak``), seeing fewer reference tokens (``weak_keep < 1``) or the null condition.
    null_weak: the CFG+SG variant.
    weak_keep: fraction of reference tokens the weak branch sees (``1.0`` = same as the strong branch); where it
        is all that weakens the weak branch, ``generate`` refuses a call whose references it would keep whole.
    interval: ``(lo, hi)`` with ``0 <= lo < hi <= 1``: guide only at times ``lo <= t <= hi`` (1 = noise, both
        bounds included) and run the strong branch alone elsewhere; ``None`` = every step. ``lo == hi`` is refused,
        as in :class:`CFGConfig`.
    """

    scale: float = 1.5
    strong: float = 0.5
    weak: float = 0.9
    null_weak: bool = False
    interval: tuple[float, float] | None = None
    weak_keep: float = 1.0

    def __post_init__(self) -> None:
        self.scale = _check_scale(self.scale)
        for name in ("strong", "weak"):
            setattr(self, name, checks.real(name, getattr(self, name)))
        self.weak_keep = checks.real("weak_keep", self.weak_keep, 0.0, 1.0, lo_open=True)
        self.null_weak = checks.flag("null_weak", self.null_weak)
        if not 0.0 <= self.strong <= self.weak < 1.0:
            raise ValueError(f"need 0 <= strong <= weak < 1, got strong={self.strong}, weak={self.weak}")
        if self.weak_is_strong():
            raise ValueError("the weak branch equals the strong one: set strong < weak, weak_keep < 1 or null_weak")
        self.interval = _check_interval(self.interval)

    def branches(self) -> tuple[Branch, Branch]:
        return Branch(True, self.strong), Branch(not self.null_weak, self.weak, self.weak_keep)

    def weak_is_strong(self, tokens: int | None = None) -> bool:
        """Whether the weak branch is the strong one (guidance would do nothing): both conditional with every
        reference token, at the same rate, or, on a model of ``tokens`` target tokens, routing as many of them."""
        return self.weak_keep == 1.0 and self.routes_as_strong(tokens)

    def routes_as_strong(self, tokens: int | None = None) -> bool:
        """Whether the weak branch is conditional and routes as the strong one does (the same rate, or on a model of
        ``tokens`` target tokens as many of them), so that only ``weak_keep`` (fewer reference tokens) weakens it."""
        if self.null_weak:
            return False
        if tokens is None:
            return self.strong == self.weak
        return round(self.strong * tokens) == round(self.weak * tokens)


GuidanceConfig = CFGConfig | SparseGuidanceConfig


def _check_interval(interval: object) -> tuple[float, float] | None:
    if interval is None:
        return None
    if isinstance(interval, (np.ndarray, Tensor)) and interval.ndim == 1:  # a pair as an array: its numbers
        interval = interval.tolist()
    if not isinstance(interval, (tuple, list)) or len(interval) != 2:
        raise TypeError(f"interval must be a (lo, hi) pair or None, got {interval!r}")
    lo, hi = checks.real("interval[0]", interval[0]), checks.real("interval[1]", interval[1])
    if not 0.0 <= lo < hi <= 1.0:
        point = (" (a one-point interval would guide only a step whose time equals it exactly: widen it, or pass "
                 "interval=None to guide every step)") if lo == hi else ""
        raise ValueError(f"interval must be (lo, hi) with 0 <= lo < hi <= 1, got {interval}{point}")
    return lo, hi


def guided(denoise: BranchDenoiser, cfg: GuidanceConfig | None) -> Callable[[Tensor, Tensor], Tensor]:
    """Turn a branch denoiser into a plain ``denoise(x, t)`` applying ``cfg`` (``None``: conditional, dense).

    ``cfg`` is checked again and copied here: fields edited after construction are validated (``ValueError`` /
    ``TypeError`` as the constructor's), and later edits of the caller's object do not change the returned
    function."""
    if cfg is None:
        return lambda x, t: denoise(x, t, (Branch(cond=True),))[0]
    if not isinstance(cfg, (CFGConfig, SparseGuidanceConfig)):
        raise TypeError(f"guidance must be a CFGConfig or SparseGuidanceConfig, got {type(cfg).__name__}")
    cfg = dataclasses.replace(cfg)  # a validated snapshot: fn reads cfg.interval at every call
    first, second = cfg.branches()
    w = cfg.scale

    def fn(x: Tensor, t: Tensor) -> Tensor:
        inside = None
        if cfg.interval is not None:  # compared in t's dtype: float32 t = 0.6 is inside (lo, 0.6)
            inside = (t >= cfg.interval[0]) & (t <= cfg.interval[1])
            if not bool(inside.any()):
                return denoise(x, t, (first,))[0]
        d1, d2 = denoise(x, t, (first, second))
        out = w * d1 + (1 - w) * d2
        if inside is None or bool(inside.all()):
            return out
        if inside.numel() != out.shape[0]:
            raise ValueError(f"t must hold one time per sample to guide a batch that straddles the interval; got "
                             f"shape {tuple(t.shape)} for a batch of {out.shape[0]}")
        per_sample = inside.to(out.device).reshape(-1, *([1] * (out.dim() - 1)))
        return torch.where(per_sample, out, d1)

    return fn
