"""Token merging (ToMe) with an adaptive threshold and matchings cached across steps (CA-ToMe).

Pure primitives, no model knowledge; ``integrations/merging_hooks.py`` wires them into models.

One *matching* turns ``N`` tokens laid out on an ``h x w`` grid into ``M = N - r`` tokens:

1. **Destinations**: one random token per 2x2 cell (tokens outside whole cells are destinations too, so
   they are never merged); every other token is a *source*.
2. **Bipartite soft matching**: each source picks its most cosine-similar destination. ``TokenMergingConfig``
   (what the hooks use) takes the similarity after subtracting the sequence's mean token (``center=True``):
   a DiT's hidden states share a large common component that makes raw cosines ~1 for most pairs in some
   layers (an adaptive threshold then merges almost everything there); centred, they are comparable across
   layers. The functions below take ``center=`` and default to the raw cosine of ToMe / tomesd.
3. **Merge** the ``r`` sources with the highest similarity into their destinations (size-weighted average);
   ``r = int(ratio * N)`` (ToMe), or, in *adaptive* mode, the number of sources whose best similarity is at
   least ``threshold`` (CA-ToMe).
4. After the layer, **unmerge** by copying each merged token's output back to every token it absorbed.

A :class:`Matching` stores this as index tensors: ``keep`` (the original positions that survive, ascending, so
the merged sequence keeps the original order) and ``index`` (where each original token went). Merging is one
``index_add`` of every token into its slot (then a division by the slot's size); unmerging is one
``index_select`` — over the flattened batch, which on CPU is ~10x faster than per-row gather/scatter.

Batches: all samples of a batch must keep the same number of tokens (tensors stay rectangular). In adaptive
mode each sample's count is ``#{sources with best similarity >= threshold}`` and the batch merges the
**minimum** of those counts, each sample its own most similar sources. This never merges a pair below the
threshold (quality is at least that of per-sample thresholds), at the price of merging less in a batch whose
samples disagree. Destinations are shared by the batch.

:class:`MatchCache` keeps one matching per layer for one generation and decides when to recompute it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from . import checks

__all__ = [
    "MatchCache",
    "Matching",
    "TokenMergingConfig",
    "bipartite_soft_matching",
    "match",
    "num_sources",
    "random_destinations",
]


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TokenMergingConfig:
    """What to merge, how much, and how often to recompute the matching.

    ratio: fraction of a layer's tokens merged away, in ``[0, 1)`` (ToMe). ``0`` with no threshold is the
        dense model, exactly. In adaptive mode a nonzero ratio caps the fraction merged. Only sources merge
        (3 of every 2x2 cell), so ratios above 0.75 merge the same as 0.75.
    threshold: adaptive mode (CA-ToMe) when set: merge every source whose best cosine similarity (centred,
        unless ``center=False``) is at least ``threshold``, in ``[-1, inf)``. Cosine similarity never exceeds 1,
        so ``threshold > 1`` is the dense model. Centred similarities run lower than raw ones: on the shipped
        refdit-sparse-64px a centred 0.5 merges about as much as a raw 0.8 (~80 of 256 tokens per layer).
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
            self.threshold = checks.real("threshold", self.threshold, -1.0)  # a cosine: below -1 merges all
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


def _check_steps(steps: object) -> tuple[int, ...] | None:
    """``recompute_steps`` as sorted distinct step indices ``>= 0`` (``None`` stays ``None``)."""
    if steps is None:
        return None
    if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Iterable):
        raise TypeError(f"recompute_steps must be a tuple of step indices, got {type(steps).__name__}")
    return tuple(sorted({checks.integer("recompute_steps", s, lo=0) for s in steps}))


# ----------------------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Matching:
    """One merge plan for a batch of ``N``-token sequences (all index tensors int64, on the tokens' device).

    keep: ``(B, M)`` original positions of the tokens that survive (destinations and unmerged sources), ascending.
    src: ``(B, r)`` original positions of the merged sources.
    slot: ``(B, r)`` position in the merged sequence of each merged source's destination.
    index: ``(B, N)`` position in the merged sequence of every original token (what unmerge gathers).
    counts: ``(B, M)`` how many original tokens each merged token stands for (float, >= 1).
    """

    keep: Tensor
    src: Tensor
    slot: Tensor
    index: Tensor
    counts: Tensor

    # sizes kept once read (the tensors never change): the hooks read them several times per sublayer call
    @cached_property
    def batch_size(self) -> int:
        return self.index.shape[0]

    @cached_property
    def num_tokens(self) -> int:
        return self.index.shape[1]

    @cached_property
    def num_kept(self) -> int:
        return self.keep.shape[1]

    @cached_property
    def num_merged(self) -> int:
        return self.src.shape[1]

    @property
    def is_inference(self) -> bool:
        """Whether any of its index tensors (or their flattened forms, once made) was made under
        ``torch.inference_mode()``: autograd cannot save those for backward, so such a matching is never reused
        where autograd records (see :meth:`MatchCache.lookup`)."""
        made = [self.keep, self.src, self.slot, self.index, self.counts]
        made += [self.__dict__[k] for k in ("_flat_index", "_flat_keep", "_counts_column") if k in self.__dict__]
        return any(t.is_inference() for t in made)

    def fits(self, x: Tensor) -> bool:
        """Whether ``x`` ``(B, N, ...)`` has the batch size, length and device this matching was made for."""
        return (x.shape[0] == self.batch_size and x.shape[1] == self.num_tokens
                and x.device == self.index.device)

    def expand(self, batch: int) -> Matching:
        """This batch-1 matching shared by ``batch`` samples (e.g. where positions must be the same for all)."""
        if self.batch_size != 1:
            raise ValueError(f"only a batch-1 matching can be expanded, this one has batch {self.batch_size}")
        return Matching(*(t.expand(batch, *t.shape[1:]) for t in (self.keep, self.src, self.slot, self.index,
                                                                   self.counts)))

    @cached_property
    def _flat_index(self) -> Tensor:
        """``index`` as rows of the flattened ``(B*M, C)`` merged batch, ``(B*N,)``: one index_select/index_add.
        A batch of one needs no row offsets: its ``index`` itself (a view, no ops; the usual case at inference)."""
        if self.batch_size == 1:
            return self.index.reshape(-1)
        offsets = torch.arange(self.batch_size, device=self.index.device)[:, None] * self.num_kept
        return (self.index + offsets).reshape(-1)

    @cached_property
    def _flat_keep(self) -> Tensor:
        """``keep`` as rows of the flattened ``(B*N, C)`` input batch, ``(B*M,)`` (batch one: ``keep`` itself)."""
        if self.batch_size == 1:
            return self.keep.reshape(-1)
        offsets = torch.arange(self.batch_size, device=self.keep.device)[:, None] * self.num_tokens
        return (self.keep + offsets).reshape(-1)

    @cached_property
    def _counts_column(self) -> Tensor:
        """``counts`` as a column ``(B*M, 1)`` of the flattened merged batch, what a mean merge divides by."""
        return self.counts.reshape(-1, 1)

    def merge(self, x: Tensor, mode: str = "mean", size: Tensor | None = None) -> Tensor:
        """``(B, N, ...)`` -> ``(B, M, ...)``.

        mode ``"mean"``: each kept token becomes the average of itself and the sources merged into it,
        weighted by ``size`` ``(B, N)`` (how many tokens each input token already stands for; default 1).
        mode ``"keep"``: drop merged sources, keep the destination's value (positions, RoPE tables).
        One ``index_add`` (or ``index_select``) over the flattened batch: ~10x faster on CPU than
        per-row gather/scatter, which matters because merging pays only if it costs less than it saves.
        ``ValueError`` for an ``x`` (or ``size``) whose batch or length is not this matching's (it would be read
        as other rows), ``TypeError`` for an ``x`` that is not floating point with ``mode="mean"``.
        """
        if mode not in ("mean", "keep"):
            raise ValueError(f"mode must be 'mean' or 'keep', got {mode!r}")
        self._check("x", x, self.num_tokens, "N")
        if mode == "mean" and not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"merging with mode='mean' averages tokens: x must be floating point, got {x.dtype} "
                            "(mode='keep' takes any dtype)")
        if size is not None:
            self._check("size", size, self.num_tokens, "N", exact=True)
        if self.num_merged == 0:
            return x
        b, n, m = self.batch_size, self.num_tokens, self.num_kept
        flat = x.reshape(b * n, -1)
        if mode == "keep":
            return flat.index_select(0, self._flat_keep).reshape(b, m, *x.shape[2:])
        out = flat.new_zeros(b * m, flat.shape[1])
        if size is None:
            counts = self._counts_column
            if counts.dtype != out.dtype:
                counts = counts.to(out.dtype)
            out.index_add_(0, self._flat_index, flat).div_(counts)
        else:
            w = size.reshape(b * n, 1).to(flat.dtype)
            out.index_add_(0, self._flat_index, flat * w).div_(self.merge_size(size).reshape(-1, 1).to(out.dtype))
        return out.reshape(b, m, *x.shape[2:])

    def merge_size(self, size: Tensor | None = None) -> Tensor:
        """Sizes ``(B, M)`` of the merged tokens, given the input tokens' sizes ``(B, N)`` (default 1)."""
        if size is None:
            return self.counts
        self._check("size", size, self.num_tokens, "N", exact=True)
        flat = size.reshape(-1)
        out = flat.new_zeros(self.batch_size * self.num_kept).index_add_(0, self._flat_index, flat)
        return out.reshape(self.batch_size, self.num_kept)

    def unmerge(self, y: Tensor) -> Tensor:
        """``(B, M, ...)`` -> ``(B, N, ...)``: every original token gets its merged token's value (``ValueError`` for a
        ``y`` whose batch or length is not this matching's merged one)."""
        self._check("y", y, self.num_kept, "M")
        if self.num_merged == 0:
            return y
        flat = y.reshape(self.batch_size * self.num_kept, -1)
        return flat.index_select(0, self._flat_index).reshape(self.batch_size, self.num_tokens, *y.shape[2:])

    def _check(self, name: str, x: object, n: int, axis: str, exact: bool = False) -> None:
        """``x`` must be a tensor ``(B, n, ...)`` (``exact``: ``(B, n)``) of this matching's batch: a reshape of the
        flattened batch would otherwise read another shape with as many elements as other rows, silently."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        shape = tuple(x.shape)
        if len(shape) < 2 or shape[:2] != (self.batch_size, n) or (exact and len(shape) != 2):
            want = f"({self.batch_size}, {n}{'' if exact else ', ...'})"
            raise ValueError(f"{name} must be (B, {axis}{'' if exact else ', ...'}) = {want} for this matching "
                             f"(batch {self.batch_size}, {self.num_tokens} tokens -> {self.num_kept}), got {shape}")


def random_destinations(h: int, w: int, generator: torch.Generator | None = None,
                        cell: tuple[int, int] = (2, 2)) -> Tensor:
    """Boolean mask ``(h*w,)`` over a row-major grid: one random destination per ``cell``; True = destination.

    Tokens in the partial cells at the bottom / right edge are destinations (never merged). ``h``, ``w``: ints
    ``>= 0``; ``cell``: a pair of ints ``>= 1``; ``TypeError`` / ``ValueError`` naming the argument otherwise.
    """
    h, w = checks.integer("h", h, lo=0), checks.integer("w", w, lo=0)
    sy, sx = _pair("cell", cell, lo=1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    hc, wc = h // sy, w // sx
    is_dst = torch.ones(h, w, dtype=torch.bool)
    if hc and wc:
        pick = torch.randint(sy * sx, (hc, wc), generator=generator)                # (hc, wc)
        cells = torch.zeros(hc, wc, sy * sx, dtype=torch.bool)
        cells.scatter_(2, pick[..., None], True)
        cells = cells.reshape(hc, wc, sy, sx).permute(0, 2, 1, 3).reshape(hc * sy, wc * sx)
        is_dst[: hc * sy, : wc * sx] = cells
    return is_dst.reshape(-1)


def num_sources(h: int, w: int, cell: tuple[int, int] = (2, 2)) -> int:
    """How many sources (False) every :func:`random_destinations` mask of an ``h x w`` grid holds, whatever it draws:
    each whole ``cell`` has one destination, the partial cells at the edges none but destinations. Arithmetic (the
    token mergers needed the count at every step and layer, and counted the mask: three ops and a host read)."""
    sy, sx = cell
    return (h // sy) * (w // sx) * (sy * sx - 1)


def match(metric: Tensor, is_dst: Tensor, *, num: int | None = None, threshold: float | None = None,
          cap: int | None = None, center: bool = False) -> Matching:
    """Bipartite soft matching of ``metric`` ``(B, N, C)`` with destinations ``is_dst``, a bool ``(N,)`` (True =
    destination).

    Exactly one of ``num`` (merge this many sources, ToMe) and ``threshold`` (merge sources whose best
    cosine similarity is ``>= threshold``, the minimum count over the batch, CA-ToMe) is given; ``cap`` bounds
    the adaptive count. ``center``: cosine similarity of the tokens minus their sequence's mean token (two
    tokens both equal to the mean, e.g. in a constant sequence, have similarity 1).
    Ties are broken by position (stable sort), so results are deterministic.
    """
    if (num is None) == (threshold is None):
        raise ValueError("give exactly one of num and threshold")
    if metric.ndim != 3:
        raise ValueError(f"metric must be (B, N, C), got shape {tuple(metric.shape)}")
    b, n, _ = metric.shape
    if not isinstance(is_dst, Tensor) or is_dst.dtype != torch.bool:  # ~ of 0/1 ints is -1/-2: every token a source
        got = is_dst.dtype if isinstance(is_dst, Tensor) else type(is_dst).__name__
        raise TypeError(f"is_dst must be a bool tensor (True = destination, as random_destinations gives), got {got}")
    if is_dst.shape != (n,):
        raise ValueError(f"is_dst must have shape ({n},), got {tuple(is_dst.shape)}")
    src_pos, dst_pos = destination_positions(is_dst.to(metric.device))
    return match_positions(metric, src_pos, dst_pos, num=num, threshold=threshold, cap=cap, center=center)


def destination_positions(is_dst: Tensor) -> tuple[Tensor, Tensor]:
    """``(src_pos, dst_pos)``: the ascending positions of the sources (False) and destinations (True) of a mask
    from :func:`random_destinations`, as :func:`match_positions` takes them (worth keeping where a mask is reused)."""
    return (~is_dst).nonzero().squeeze(1), is_dst.nonzero().squeeze(1)


def match_positions(metric: Tensor, src_pos: Tensor, dst_pos: Tensor, *, num: int | None = None,
                    threshold: float | None = None, cap: int | None = None, center: bool = False) -> Matching:
    """:func:`match` with the destinations given as positions: ``src_pos`` and ``dst_pos``, int64 on ``metric``'s
    device, ascending, together every position ``0 .. N-1`` once (:func:`destination_positions` of the mask).

    The work of a matching, unchecked: the token mergers call it for every layer at every step, where a few
    microseconds per op add up (they cache the positions per step and layer, and ``match`` computes them). Fewer
    ops than the plain formulation with the same results, bit for bit: each norm is computed once (centring's
    and the normalisation's), index tensors are made in place, and a batch of one needs no row offsets.
    """
    b, n = metric.shape[0], metric.shape[1]
    device = metric.device
    n_src = src_pos.numel()
    limit = n_src if cap is None else max(0, min(cap, n_src))
    if n_src == 0 or dst_pos.numel() == 0 or (num is not None and num <= 0) or limit == 0:
        r = 0
    else:
        with torch.no_grad():
            m = metric if metric.dtype in (torch.float32, torch.float64) else metric.float()  # fp16/bf16: in fp32
            at_mean = None
            if center:  # a token equal to its sequence's mean centres to zero: two such tokens are identical
                c = m - m.mean(1, keepdim=True)
                norm = torch.linalg.vector_norm(c, dim=-1, keepdim=True)           # (B, N, 1)
                at_mean = norm <= 1e-5 * torch.linalg.vector_norm(m, dim=-1, keepdim=True)
                m = c
            else:
                norm = torch.linalg.vector_norm(m, dim=-1, keepdim=True)
            m = m / norm.clamp_min(1e-6)  # F.normalize(m, dim=-1, eps=1e-6), whose norm is the one above
            scores = m.index_select(1, src_pos) @ m.index_select(1, dst_pos).transpose(1, 2)  # (B, Ns, Nd)
            if at_mean is not None and bool(at_mean.any()):
                at_mean = at_mean.squeeze(-1)                                      # (B, N)
                both = at_mean.index_select(1, src_pos)[:, :, None] & at_mean.index_select(1, dst_pos)[:, None]
                scores = scores.masked_fill(both, 1.0)
            best, best_dst = scores.max(dim=-1)                                    # (B, Ns)
        if num is not None:
            r = min(num, n_src)
        else:
            r = min(int((best >= threshold).sum(dim=-1).min()), limit)

    if r == 0:
        keep = torch.arange(n, device=device).repeat(b, 1)
        return Matching(keep=keep, src=keep[:, :0], slot=keep[:, :0], index=keep,
                        counts=torch.ones(b, n, device=device, dtype=metric.dtype if metric.is_floating_point()
                                          else torch.float32))

    merged_local = best.argsort(dim=-1, descending=True, stable=True)[:, :r]      # (B, r), ties by position
    src = src_pos.take(merged_local)                                               # (B, r)
    dst_of_src = dst_pos.take(best_dst.gather(1, merged_local))                    # (B, r)
    kept = torch.ones(b, n, dtype=torch.bool, device=device).scatter_(1, src, False)  # (B, N)
    mk = n - r
    keep = kept.nonzero()[:, 1].reshape(b, mk)                                     # (B, M), ascending
    index = kept.cumsum(1).sub_(1)                                                 # slot of each kept token
    slot = index.gather(1, dst_of_src)
    index.scatter_(1, src, slot)
    counts = torch.ones(b, mk, device=device, dtype=metric.dtype)
    counts.scatter_add_(1, slot, torch.ones(b, r, device=device, dtype=metric.dtype))
    return Matching(keep=keep, src=src, slot=slot, index=index, counts=counts)


def bipartite_soft_matching(metric: Tensor, grid: tuple[int, int], *, ratio: float = 0.0,
                            threshold: float | None = None, generator: torch.Generator | None = None,
                            cell: tuple[int, int] = (2, 2), center: bool = False,
                            ) -> tuple[Callable[..., Tensor], Callable[[Tensor], Tensor]]:
    """ToMe in one call: ``(merge, unmerge)`` for tokens ``metric`` ``(B, h*w, C)`` on ``grid = (h, w)``.

    ``ratio`` merges ``int(ratio * N)`` tokens; with ``threshold`` set, merges adaptively (``ratio`` > 0 caps).
    ``center`` defaults to the raw cosine of ToMe here (``TokenMergingConfig``, used by the hooks, centres by
    default). Destinations are drawn with ``generator`` (the global RNG when ``None``). ``ratio``,
    ``threshold`` and ``center`` are checked as :class:`TokenMergingConfig` checks them; ``grid`` and ``cell``
    must be pairs of ints (``grid`` sides >= 0, ``cell`` sides >= 1).
    """
    TokenMergingConfig(ratio=ratio, threshold=threshold, center=center)  # validates, names the bad argument
    if metric.ndim != 3:
        raise ValueError(f"metric must be (B, N, C), got shape {tuple(metric.shape)}")
    h, w = _pair("grid", grid, lo=0)  # cell and generator: checked by random_destinations
    n = metric.shape[1]
    if h * w != n:
        raise ValueError(f"grid {grid} has {h * w} tokens, metric has {n}")
    is_dst = random_destinations(h, w, generator, cell)
    n_src = num_sources(h, w, cell)
    if threshold is None:
        m = match(metric, is_dst, num=int(n * ratio), center=center)
    else:
        m = match(metric, is_dst, threshold=threshold, cap=int(n * ratio) if ratio > 0 else n_src, center=center)
    return m.merge, m.unmerge


def _pair(name: str, value: object, lo: int) -> tuple[int, int]:
    """``value`` as two ints ``>= lo`` (a grid or cell ``(h, w)``); errors name ``name``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or len(value := tuple(value)) != 2:
        raise TypeError(f"{name} must be a pair of ints (h, w), got {value!r:.80}")
    return checks.integer(f"{name}[0]", value[0], lo=lo), checks.integer(f"{name}[1]", value[1], lo=lo)


# ----------------------------------------------------------------------------------------------------------
# Cache across denoising steps
# ----------------------------------------------------------------------------------------------------------


MAX_PASSES = 8  # distinct model calls per step kept apart; more (a fixed-timestep loop) reuse the slots


class MatchCache:
    """Matchings of one generation, one per (layer, pass), recomputed only at chosen steps.

    ``lookup(layer, step, x, compute, call)`` returns the stored matching for ``layer`` when the policy says to
    reuse it and it fits ``x``; otherwise it calls ``compute()`` and stores the result -- including at step 0,
    so step 1 already hits. Several model calls within a step (guidance passes run one after another) are
    kept apart as passes 0, 1, ...: with a ``call`` fingerprint (the hooks pass
    :func:`tokensparse.integrations.merging_core.call_key`), the pass is the order in which the step first
    saw that call, so an identical call repeated within a step gets its own earlier matching back; without
    one, each lookup of a layer is the next pass. At most :data:`MAX_PASSES` passes per step are kept (then
    the slots are reused, and calls seen before are forgotten), so a loop at one timestep cannot grow the
    cache; identical calls repeat their matching while a step sees at most :data:`MAX_PASSES` distinct
    calls. :meth:`reset` starts a new generation: nothing computed before it is ever returned after it.
    A matching made under ``torch.inference_mode()`` is never returned where autograd records (grad mode on,
    outside inference mode): its index tensors cannot be saved for backward; it is recomputed there instead.
    """

    def __init__(self, recompute_every: int = 1, recompute_steps: tuple[int, ...] | None = None) -> None:
        self.recompute_every = checks.integer("recompute_every", recompute_every, lo=1)  # 2.5 recomputed at 0, 5, ...
        steps = _check_steps(recompute_steps)
        self.recompute_steps = None if steps is None else frozenset(steps)
        self.generation = 0
        self.hits = 0
        self.misses = 0
        self._entries: dict[Hashable, tuple[int, Hashable, Matching]] = {}
        self._step: int | None = None
        self._passes: dict[Hashable, int] = {}
        self._calls: list[Hashable] = []

    def __len__(self) -> int:
        return len(self._entries)

    def reset(self) -> None:
        """Forget every matching (a new generation starts)."""
        self.generation += 1
        self.hits = self.misses = 0
        self._entries.clear()
        self._passes.clear()
        self._calls.clear()
        self._step = None

    def recompute_at(self, step: int) -> bool:
        """Whether the policy recomputes at ``step`` (when a stored matching exists)."""
        if self.recompute_steps is not None:
            return step == 0 or step in self.recompute_steps
        return step % self.recompute_every == 0

    def _pass(self, layer: Hashable, call: Hashable | None) -> int:
        if call is None:
            p = self._passes.get(layer, 0)
            self._passes[layer] = (p + 1) % MAX_PASSES
            return p
        if call not in self._calls:
            if len(self._calls) == MAX_PASSES:
                self._calls.clear()
            self._calls.append(call)
        return self._calls.index(call)

    def lookup(self, layer: Hashable, step: int, x: Tensor, compute: Callable[[], Matching],
               call: Hashable | None = None) -> Matching:
        if step != self._step:
            self._step = step
            self._passes.clear()
            self._calls.clear()
        key = (layer, self._pass(layer, call))
        entry = self._entries.get(key)
        if entry is not None and (  # the policy first: with recompute_every=1 it decides alone, at no cost
            entry[1] == call if entry[0] == step else not self.recompute_at(step)
        ) and entry[2].fits(x) and not _unusable_here(entry[2]):
            self.hits += 1
            return entry[2]
        matching = compute()
        self.misses += 1
        self._entries[key] = (step, call, matching)
        return matching


def _unusable_here(m: Matching) -> bool:
    """Whether autograd records here (grad mode on, outside inference mode) and ``m`` was made under inference mode:
    merging or unmerging with it would fail ("Inference tensors cannot be saved for backward")."""
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and m.is_inference
