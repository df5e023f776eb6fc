"""Token scorers: which reference tokens are informative. Pure functions, no model knowledge.

A scorer maps one reference, seen as a :class:`RefView`, to a score per token ``(B, h*w)``; the
budget then keeps the highest-scoring tokens. Scorers register themselves by name in ``SCORERS``,
which is also the list of valid ``SparseContextConfig.selector`` values.

Scores of the *informed* scorers (``edges``, ``foreground``, ``attention``, ``auto``) are non-negative, so budgets
may sum them as "mass" (adaptive budgets, allocation across references by each token's share of its reference's
mass); those of ``edges``, ``foreground`` and ``attention`` are near zero where a token carries nothing. ``auto`` is
as informed as the scorer it picks per sample: for an editing prompt (and a reference it judges a scene) that is
``uniform``, whose scores are dithering ranks that carry no content, so an adaptive budget on an edit keeps a fixed
fraction of the grid whatever the image (about 69 %: 44 of 64 tokens at the default mass 0.9).
Every scorer only needs ``features``; ``image`` (pixels) and ``attention`` (a model probe) refine
them when the wiring provides them. The prompt-aware ``auto`` lives in :mod:`.auto`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class RefView:
    """One reference as scorers see it.

    features: ``(B, h, w, C)`` per-token features (raw patch pixels for RefDiT, VAE latents for diffusers).
    image: ``(B, 3, H, W)`` in ``[0, 1]`` when the pixels are at hand, else ``None``.
    index: position of the reference (0-based) among the references of the call.
    prompts: the prompts of the batch, one per sample, when known.
    attention: ``(B, h, w)`` attention mass the target paid to each token in a probe pass, when the
        wiring ran one (RefDiT with ``selector="attention"``, or ``"auto"`` if ``FAMILY_SCORER`` names it), else
        ``None``.
    """

    features: Tensor
    image: Tensor | None = None
    index: int = 0
    prompts: list[str] | None = None
    attention: Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("features", "image"):
            value = getattr(self, name)
            if value is None and name == "image":
                continue
            if not isinstance(value, Tensor):
                raise TypeError(f"RefView {name} must be a tensor, got {type(value).__name__}")
            if value.dim() != 4 or value.shape[0] != self.features.shape[0]:
                want = "(B, h, w, C)" if name == "features" else f"None or (B={self.features.shape[0]}, C, H, W)"
                raise ValueError(f"RefView {name} must be {want}, got {tuple(value.shape)}")
        b = self.features.shape[0]
        if self.prompts is not None:
            if isinstance(self.prompts, str):  # was read character by character: every sample lost its prompt
                raise TypeError("RefView prompts must be a list of strings, one per sample, got a str: pass [prompt]")
            if not isinstance(self.prompts, (list, tuple)) or not all(isinstance(p, str) for p in self.prompts):
                raise TypeError(f"RefView prompts must be a list of strings, one per sample, or None; got "
                                f"{self.prompts!r:.80}")
            if len(self.prompts) != b:
                raise ValueError(f"RefView prompts hold {len(self.prompts)} prompts for a batch of {b}: give one per "
                                 "sample")
        check_attention(self)

    @property
    def batch(self) -> int:
        return self.features.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.features.shape[1], self.features.shape[2]


def check_attention(view: RefView) -> None:
    """``ValueError`` unless ``view.attention`` is ``None`` or holds one value per token, ``(B, h, w)``."""
    att, (h, w) = view.attention, view.grid
    if att is not None and (not isinstance(att, Tensor) or att.shape not in ((view.batch, h, w), (view.batch, h * w))):
        got = tuple(att.shape) if isinstance(att, Tensor) else type(att).__name__
        raise ValueError(f"RefView attention must be None or a (B={view.batch}, h={h}, w={w}) tensor, got {got}")


Scorer = Callable[[RefView, torch.Generator], Tensor]
SCORERS: dict[str, Scorer] = {}
INFORMED: set[str] = set()  # scorers whose scores are a mass, >= 0 (adaptive, allocation); see the module docstring
NEEDS_PROBE: set[str] = set()  # scorers that use ``RefView.attention`` when it is available


def register_scorer(name: str, informed: bool = False, probe: bool = False) -> Callable[[Scorer], Scorer]:
    """Decorator: make ``fn`` available as ``selector=name``.

    informed: scores are non-negative, so budgets may count score mass (adaptive budgets, allocation across
        references); meant for scores near zero on empty tokens (``auto`` is informed, yet scores edits with
        ``uniform``'s content-free ranks: see the module docstring). probe: the scorer uses a model probe.
    The registered (and returned) scorer scores a reference with no tokens (a ``0 x w`` grid) as
    ``(B, 0)`` without calling ``fn``, so no scorer has to handle an empty grid itself.
    """

    def deco(fn: Scorer) -> Scorer:
        guarded = empty_guard(fn)
        SCORERS[name] = guarded
        (INFORMED.add if informed else INFORMED.discard)(name)
        (NEEDS_PROBE.add if probe else NEEDS_PROBE.discard)(name)
        return guarded

    return deco


def empty_guard(fn: Scorer) -> Scorer:
    """``fn``, but a view with no tokens scores ``(B, 0)`` float32 without calling it (pooling, gradients and
    medians crash on an empty grid)."""
    if getattr(fn, "empty_guarded", False):
        return fn

    @functools.wraps(fn)
    def scorer(view: RefView, generator: torch.Generator) -> Tensor:
        if isinstance(view, RefView) and view.grid[0] * view.grid[1] == 0:
            return view.features.new_zeros(view.batch, 0, dtype=torch.float32)
        return fn(view, generator)

    scorer.empty_guarded = True  # type: ignore[attr-defined]
    return scorer


# ---------------------------------------------------------------------------------- uninformed


@register_scorer("random")
def score_random(view: RefView, generator: torch.Generator) -> Tensor:
    """I.i.d. uniform scores: top-k is a uniformly random subset (the fine-tuning distribution)."""
    h, w = view.grid
    return torch.rand(view.batch, h * w, generator=generator, dtype=torch.float32).to(view.features.device)


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


# ---------------------------------------------------------------------------------- informed

def _nonneg(scores: Tensor) -> Tensor:
    """Informed scores are float and ``>= 0``; exact ties are broken spatially evenly by the budget."""
    return scores.float().clamp_min(0)


def token_pool(pixel_map: Tensor, h: int, w: int) -> Tensor:
    """Average a per-pixel map ``(B, H, W)`` over each token's cell -> ``(B, h*w)``."""
    return F.adaptive_avg_pool2d(pixel_map[:, None].float(), (h, w)).flatten(1)


def grid_gradient(x: Tensor) -> Tensor:
    """Gradient magnitude of a ``(B, C, H, W)`` map, per position ``(B, H, W)`` (replicate-padded diffs)."""
    xp = F.pad(x.float(), (1, 1, 1, 1), mode="replicate")
    gx = (xp[..., 1:-1, 2:] - xp[..., 1:-1, :-2]) / 2
    gy = (xp[..., 2:, 1:-1] - xp[..., :-2, 1:-1]) / 2
    return (gx.pow(2) + gy.pow(2)).mean(1).sqrt()


@register_scorer("edges", informed=True)
def score_edges(view: RefView, generator: torch.Generator) -> Tensor:
    """Structure energy: mean gradient magnitude inside each token (pixels if known, else token features).

    Flat tokens (a plain background, a smooth sky) score ~0; texture, edges and object borders score high.
    """
    h, w = view.grid
    if view.image is not None:
        energy = token_pool(grid_gradient(view.image), h, w)
    else:
        energy = grid_gradient(view.features.permute(0, 3, 1, 2)).flatten(1)
    return _nonneg(energy)


def border_background(features: Tensor) -> Tensor:
    """The reference's own background statistic: per-channel median of its border tokens, ``(B, C)``."""
    b, h, w, c = features.shape
    if h <= 2 or w <= 2:
        border = features.reshape(b, h * w, c)
    else:
        border = torch.cat([features[:, 0], features[:, -1], features[:, 1:-1, 0], features[:, 1:-1, -1]], 1)
    return border.float().median(dim=1).values


@register_scorer("foreground", informed=True)
def score_foreground(view: RefView, generator: torch.Generator) -> Tensor:
    """Distance of each token from the reference's background (median of its border tokens).

    RMS feature distance, so a subject on a plain background scores high and the background ~0; works
    on any features (patch pixels, VAE latents). A photo with no plain background scores everywhere.
    """
    _h, _w = view.grid
    feats = view.features.float()
    bg = border_background(feats)  # (B, C)
    dist = (feats - bg[:, None, None, :]).pow(2).mean(-1).sqrt()  # (B, h, w)
    return _nonneg(dist.flatten(1))


_warned_probe = False


@register_scorer("attention", informed=True, probe=True)
def score_attention(view: RefView, generator: torch.Generator) -> Tensor:
    """Attention mass from the target's queries to each token, from one probe pass of the model.

    The wiring fills ``view.attention`` (RefDiT: a probe at high noise over the first blocks). Where no
    probe is available (e.g. integrations that do not run one) it falls back to ``foreground``, with a
    one-time warning. Scores are the probe's mass above the uniform share, so tokens the target does not
    single out score 0 (a blank reference still varies a little with position: ~1/3 of its tokens score).
    """
    global _warned_probe
    h, w = view.grid
    if view.attention is None:
        if not _warned_probe:
            warnings.warn("selector 'attention' got no probe attention; using 'foreground'", stacklevel=2)
            _warned_probe = True
        return score_foreground(view, generator)
    check_attention(view)  # set after construction by the wiring's probe
    att = view.attention.reshape(view.batch, h * w).float()
    return _nonneg(att - att.mean(1, keepdim=True))  # a token at or below the uniform share scores 0


def spread_order(energy: Tensor, h: int, w: int) -> Tensor:
    """Scores ``(B, h*w)`` whose top-``k`` covers the grid evenly *and* favours high ``energy``, for every ``k``.

    Coarse to fine over cells of side 2^m (as ordered dithering): at each level, every cell that holds no
    pick yet gets its highest-energy token, taken in order of energy. So the first 4^l picks hold one
    token per cell of a 2^l x 2^l split (like ``uniform``), but the most structured one of each cell;
    with flat energy this is exactly ``uniform``. The score is ``1 - pick_step / n``.
    """
    b, n = energy.shape
    dev = energy.device
    e = energy.float() / energy.float().amax(1, keepdim=True).clamp_min(1e-12)
    e = e + 1e-3 * (1.0 - bayer_rank(h, w)).to(dev)  # unique per row; flat energy -> ordered dithering
    rows = torch.arange(h, device=dev).repeat_interleave(w)
    cols = torch.arange(w, device=dev).repeat(h)
    side = 1
    while side < max(h, w):
        side *= 2
    picked = torch.zeros(b, n, dtype=torch.bool, device=dev)
    f32 = {"dtype": torch.float32, "device": dev}  # not torch.get_default_dtype(): e is float32
    scores = torch.zeros(b, n, **f32)
    done = torch.zeros(b, 1, **f32)
    neg = torch.tensor(float("-inf"), **f32)
    while side >= 1:
        cell = ((rows // side) * (w // side + 1) + cols // side).expand(b, n)
        ncell = int(cell.max()) + 1
        has = torch.zeros(b, ncell, **f32).scatter_reduce(1, cell, picked.float(), "amax")
        cand = torch.where(picked | has.gather(1, cell).bool(), neg, e)
        best = torch.full((b, ncell), float("-inf"), **f32).scatter_reduce(1, cell, cand, "amax")
        new = (cand == best.gather(1, cell)) & torch.isfinite(cand)  # one token per open cell
        order = torch.sort(torch.where(new, e, neg), dim=1, descending=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=dev).expand(b, n).contiguous())
        scores = torch.where(new, 1.0 - (done + rank) / n, scores)
        picked |= new
        done = done + new.sum(1, keepdim=True)
        side //= 2
    return scores


@register_scorer("detail")
def score_detail(view: RefView, generator: torch.Generator) -> Tensor:
    """Structure with coverage: ``edges`` energy, picked greedily so that kept tokens also spread evenly.

    For pixel-aligned edits, where every region must be reconstructed from nearby kept tokens.
    """
    h, w = view.grid
    return spread_order(score_edges(view, generator), h, w)
