"""Token merging's config: what to merge, how much, and how often to recompute the matching (see the package
docstring for the method)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import checks
from .cache import MatchCache, _check_steps


@dataclass
class TokenMergingConfig:
    """What to merge, how much, and how often to recompute the matching.

    ratio: fraction of a layer's tokens merged away, in ``[0, 1)`` (ToMe). ``0`` with no threshold is the
        dense model, exactly. In adaptive mode a nonzero ratio caps the fraction merged. Only sources merge
        (3 of every 2x2 cell), so ratios above 0.75 merge the same as 0.75.
    threshold: adaptive mode (CA-ToMe) when set: merge every source whose best cosine similarity (centred,
        unless ``center=False``) is at least ``threshold``, in ``[-1, inf]``. Cosine similarity never exceeds 1,
        so ``threshold > 1`` (``float("inf")`` too) is the dense model, exactly. Centred similarities run lower than
        raw ones: on the shipped refdit-sparse-64px a centred 0.5 merges about as much as a raw 0.8 (~80 of 256
        tokens per layer).
        A batch merges the smallest of its samples' counts, so a sample's output depends on its batch.
    recompute_every: recompute a layer's matching every this many denoising steps and reuse it in between
        (``1``: every step, no cache). A model call whose samples are at different timesteps (a training
        batch) always computes its own.
    recompute_steps: explicit steps (0-based) at which to recompute; overrides ``recompute_every``.
        Step 0 always computes (there is nothing to reuse yet).
    merge_attn / merge_cross / merge_mlp: which sublayers of a block run on merged tokens: self-attention,
        cross-attention (UNets; RefDiT has none), feed-forward.
    max_downsample: merge only in layers whose token grid is at most this much coarser than the finest one
        (UNets: ``1`` = top level only, like tomesd; ``2`` adds the next level, ...; SDXL-style UNets have no
        attention at the top level, so they need ``2``). DiTs have one level (PixArt / DiT: the latent grid
        divided by the model's ``patch_size``).
    seed: seeds the random destinations: a layer's destinations at a step depend only on ``seed``, the step and
        the layer, so every pass of a step (CFG's two calls, guidance branches) draws the same ones.
    center: measure similarity after subtracting each sequence's mean token (default; see the module
        docstring). ``False`` gives the raw cosine of ToMe / tomesd (and of tokensparse before 0.2): thresholds
        tuned for raw cosines merge far less when centred. ``benchmarks/merging.py`` runs ToMe both ways
        (``tome_r0.5_raw``, ``ours_r0.5_raw``).
    """

    ratio: float = 0.0
    threshold: float | None = None
    recompute_every: int = 1
    recompute_steps: tuple[int, ...] | None = None
    merge_attn: bool = True
    merge_mlp: bool = True
    merge_cross: bool = False
    max_downsample: int = 1
    seed: int = 0
    center: bool = True

    def __post_init__(self) -> None:
        self.ratio = checks.real("ratio", self.ratio, 0.0, 1.0, hi_open=True)
        if self.threshold is not None:
            self.threshold = _check_threshold(self.threshold)
        self.recompute_every = checks.integer("recompute_every", self.recompute_every, lo=1)
        self.recompute_steps = _check_steps(self.recompute_steps)
        for name in ("merge_attn", "merge_mlp", "merge_cross", "center"):
            setattr(self, name, checks.flag(name, getattr(self, name)))
        self.max_downsample = checks.integer("max_downsample", self.max_downsample, lo=1)
        self.seed = checks.seed("seed", self.seed)

    @property
    def adaptive(self) -> bool:
        return self.threshold is not None

    @property
    def is_identity(self) -> bool:
        """True when nothing is ever merged: the model computes exactly what it computes without merging."""
        if not (self.merge_attn or self.merge_mlp or self.merge_cross):
            return True
        if self.threshold is None:
            return self.ratio == 0.0
        return self.threshold > 1.0

    def num_merged(self, n_tokens: int, n_sources: int) -> int:
        """Most tokens a layer of ``n_tokens`` (``n_sources`` of them sources) may merge."""
        if self.threshold is None:
            return min(int(n_tokens * self.ratio), n_sources)
        if self.ratio > 0.0:
            return min(int(n_tokens * self.ratio), n_sources)
        return n_sources

    def make_cache(self) -> MatchCache:
        return MatchCache(self.recompute_every, self.recompute_steps)


def _check_threshold(value: object) -> float:
    """``threshold`` as a float in ``[-1, inf]``: a cosine, so below -1 would merge all, and anything above 1, ``inf``
    included, merges nothing (NaN and ``-inf`` are refused, naming ``threshold``)."""
    try:
        return checks.real("threshold", value, -1.0)
    except ValueError:  # checks.real refuses every non-finite value; +inf (a float, 0-d array or tensor) is dense
        try:
            if float(value) == math.inf:  # type: ignore[arg-type]
                return math.inf
        except OverflowError:  # an int too large for a float: above 1 all the same
            return math.inf
        except (TypeError, ValueError):
            pass
        raise
