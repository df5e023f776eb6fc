"""Token merging wired into models through forward hooks (no class swaps, no copied forwards).

Supported targets (a pipeline is accepted too: its ``.transformer`` or ``.unet`` is patched):

- **RefDiT**: each ``RefDiTBlock.attn`` merges its target tokens ``x`` (average) and their RoPE table
  ``x_rope`` (each kept token keeps its own), and unmerges the target output; ``RefDiTBlock.mlp`` does the
  same when called with ``role="target"``. Context tokens are never merged (that is Sparse Context's job).
- **diffusers UNets** (SD-style, any model built of ``BasicTransformerBlock``): ``attn1`` / ``attn2`` / ``ff``
  merge their input tokens and unmerge their output, in blocks whose token grid is at most
  ``cfg.max_downsample`` times coarser than the latent.
- **diffusers FLUX / FLUX.2 transformers**: the image stream of the double-stream blocks (``attn``: image
  tokens and the image rows of the RoPE table; ``ff``). Text tokens and single-stream blocks are untouched.

Per block, the first merged sublayer computes (or, between recompute steps, looks up) the matching from its
input; the block's later sublayers reuse it. A forward pre-hook on the model reads the timestep and feeds a
:class:`~tokensparse.generation.StepTracker`, which numbers the steps and notices a new generation when the
timestep rises; :func:`tokensparse.generation.begin_generation` (``tokensparse.generate`` calls it; for
pipelines ``scheduler.set_timesteps`` does) starts one explicitly. Each new generation empties the match
cache and reseeds the destination generator.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..generation import StepTracker, check_scheduler, on_generation_start, remove_generation_callback
from ..merging import Matching, TokenMergingConfig, match, random_destinations
from ..models.refdit import RefDiT
from .calls import as_keywords, first_arg

__all__ = ["TokenMergingState", "apply_token_merging", "merging_state", "remove_token_merging"]

logger = logging.getLogger(__name__)

_STATE = "_tokensparse_token_merging"
_CALLBACK = "token_merging"


# ----------------------------------------------------------------------------------------------------------
# Per-model state
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TokenMergingState:
    """What :func:`apply_token_merging` attached to a model: config, step counter, cache, hook handles."""

    cfg: TokenMergingConfig
    model: nn.Module
    owners: list[Any] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    tracker: StepTracker = field(default_factory=StepTracker)
    latent_hw: tuple[int, int] | None = None
    merged_tokens: int = 0  # tokens merged away in the last generation, summed over layers and calls
    grids_found: int = 0  # blocks of the current model call whose tokens formed a grid this config merges
    warned: bool = False

    def __post_init__(self) -> None:
        self.cache = self.cfg.make_cache()
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self._generation = self.tracker.generation

    @property
    def step(self) -> int:
        return max(self.tracker.step, 0)

    def new_generation(self) -> None:
        self.tracker.reset()

    def observe(self, t: Any) -> None:
        """Record the timestep of a model call; starts a fresh cache when a new generation begins."""
        for owner in self.owners[1:]:  # a pipeline whose scheduler was swapped after apply
            check_scheduler(owner)
        self.grids_found = 0
        if isinstance(t, Tensor):
            t = t.flatten()[0].item() if t.numel() else 0.0
        self.tracker.observe(float(t))
        if self.tracker.generation != self._generation:
            self._generation = self.tracker.generation
            self.cache.reset()
            self.generator.manual_seed(self.cfg.seed)
            self.merged_tokens = 0

    def matching(self, layer: str, x: Tensor, grid: tuple[int, int], shared: bool = False) -> Matching:
        """The matching of ``layer`` for tokens ``x`` at this step (computed, or reused from the cache).

        shared: one matching for the whole batch, computed from the batch-mean metric (for models whose
        positional tables have no batch dimension, like FLUX's RoPE).
        """
        cfg = self.cfg
        n = x.shape[1]

        def compute() -> Matching:
            is_dst = random_destinations(grid[0], grid[1], self.generator)
            n_src = int((~is_dst).sum())
            metric = x.mean(0, keepdim=True) if shared else x
            if cfg.adaptive:
                m = match(metric, is_dst, threshold=cfg.threshold, cap=cfg.num_merged(n, n_src), center=cfg.center)
            else:
                m = match(metric, is_dst, num=cfg.num_merged(n, n_src), center=cfg.center)
            return m.expand(x.shape[0]) if shared else m

        m = self.cache.lookup(layer, self.step, x, compute)
        self.merged_tokens += m.num_merged
        return m


def merging_state(target: Any) -> TokenMergingState | None:
    """The :class:`TokenMergingState` of a patched model or pipeline, or ``None``."""
    model = _resolve(target)[0] if target is not None else None
    return None if model is None else model.__dict__.get(_STATE)


# ----------------------------------------------------------------------------------------------------------
# One block: which sublayers merge, how to find their tokens
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Sublayer:
    module: nn.Module
    tokens: str  # name of the token argument: positional index 0 or this keyword
    rope: str | None = None  # how to merge the positional table: "refdit" | "flux" | None
    target_only: bool = False  # RefDiT mlp: only calls with role="target"
    tuple_out: bool = False  # output is (tokens, other)


class _BlockMerger:
    """Hooks on the sublayers of one block; the first merged sublayer owns the matching lookup."""

    def __init__(self, state: TokenMergingState, name: str, sublayers: list[_Sublayer],
                 grid: Callable[[int], tuple[int, int] | None], shared: bool = False) -> None:
        self.state, self.name, self.grid, self.shared = state, name, grid, shared
        self.current: Matching | None = None
        for i, sub in enumerate(sublayers):
            pre = self._pre_hook(sub, owner=(i == 0))
            post = self._post_hook(sub)
            state.handles.append(sub.module.register_forward_pre_hook(pre, with_kwargs=True))
            state.handles.append(sub.module.register_forward_hook(post, with_kwargs=True))

    def _pre_hook(self, sub: _Sublayer, owner: bool) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            module.__dict__["_tokensparse_active"] = None
            if sub.target_only and kwargs.get("role", "target") != "target":
                return None
            from_kwargs = not args
            x = kwargs[sub.tokens] if from_kwargs else args[0]
            if owner:
                grid = self.grid(x.shape[1])
                self.state.grids_found += grid is not None
                self.current = None if grid is None else self.state.matching(self.name, x, grid, self.shared)
            m = self.current
            if m is None or m.num_merged == 0 or not m.fits(x):
                return None
            module.__dict__["_tokensparse_active"] = m
            merged = m.merge(x)
            if from_kwargs:
                kwargs = {**kwargs, sub.tokens: merged}
            else:
                args = (merged, *args[1:])
            if sub.rope == "refdit":  # (x, x_rope, ctx, ...): each kept token keeps its own rotation
                if len(args) > 1:
                    args = (args[0], m.merge(args[1], mode="keep"), *args[2:])
                else:
                    kwargs = {**kwargs, "x_rope": m.merge(kwargs["x_rope"], mode="keep")}
            elif sub.rope == "flux":
                kwargs = _flux_rope(kwargs, m, x.shape[1])
            return args, kwargs

        return hook

    def _post_hook(self, sub: _Sublayer) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            m = module.__dict__.pop("_tokensparse_active", None)
            if m is None:
                return None
            if sub.tuple_out or isinstance(output, tuple):
                return (m.unmerge(output[0]), *output[1:])
            return m.unmerge(output)

        return hook


def _flux_rope(kwargs: dict, m: Matching, n_img: int) -> dict:
    """Keep the RoPE rows of the text tokens and of the kept image tokens (FLUX: text first, then image).

    FLUX's tables ``(S_txt + N, D)`` have no batch dimension, so FLUX blocks use one matching per batch.
    """
    rope = kwargs.get("image_rotary_emb")
    if rope is None:
        return kwargs
    keep = m.keep[0]

    def sub(table: Tensor) -> Tensor:
        n_txt = table.shape[0] - n_img
        return torch.cat([table[:n_txt], table[n_txt:][keep]], dim=0)

    new = tuple(sub(t) for t in rope) if isinstance(rope, (tuple, list)) else sub(rope)
    return {**kwargs, "image_rotary_emb": new}


# ----------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------


def _resolve(target: Any) -> tuple[nn.Module | None, Any]:
    """(model to patch, pipeline or None)."""
    if isinstance(target, nn.Module):
        return target, None
    for attr in ("transformer", "unet"):
        model = getattr(target, attr, None)
        if isinstance(model, nn.Module):
            return model, target
    return None, None


def _wire_refdit(model: RefDiT, state: TokenMergingState) -> None:
    cfg = state.cfg
    side = model.config.grid

    def grid(n: int) -> tuple[int, int] | None:
        return (side, side) if n == side * side else None

    def observe(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state.observe(first_arg(as_keywords(module, args, kwargs), "t"))

    state.handles.append(model.register_forward_pre_hook(observe, with_kwargs=True))
    for i, blk in enumerate(model.blocks):
        subs = []
        if cfg.merge_attn:
            subs.append(_Sublayer(blk.attn, "x", rope="refdit", tuple_out=True))
        if cfg.merge_mlp:
            subs.append(_Sublayer(blk.mlp, "x", target_only=True))
        if subs:
            _BlockMerger(state, f"blocks.{i}", subs, grid)


def _diffusers_classes() -> dict[str, type]:
    if "diffusers" not in sys.modules:  # nothing can be a diffusers model before diffusers is imported
        return {}
    try:
        from diffusers.models.attention import BasicTransformerBlock
    except ImportError:  # diffusers not installed: only RefDiT is supported
        return {}
    out: dict[str, type] = {"basic": BasicTransformerBlock}
    try:
        from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

        out["flux"] = FluxTransformerBlock
    except ImportError:
        pass
    try:
        from diffusers.models.transformers.transformer_flux2 import Flux2TransformerBlock

        out["flux2"] = Flux2TransformerBlock
    except ImportError:
        pass
    return out


def _latent_grid(state: TokenMergingState, n: int) -> tuple[int, int] | None:
    """Grid of a UNet level with ``n`` tokens: the latent downsampled ``d`` times (ceil), ``d <= max``."""
    if state.latent_hw is None:
        return None
    h, w = state.latent_hw
    d = 1
    while d <= state.cfg.max_downsample:
        gh, gw = math.ceil(h / d), math.ceil(w / d)
        if gh * gw == n:
            return gh, gw
        d *= 2
    return None


def _wire_unet(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    cfg = state.cfg
    patch = int(getattr(getattr(model, "config", None), "patch_size", None) or 1)  # UNets: 1

    def observe(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = as_keywords(module, args, kwargs)
        sample = first_arg(call, "sample", "hidden_states")
        if isinstance(sample, Tensor) and sample.dim() == 4:  # patchifying DiTs (PixArt, DiT): tokens per side
            state.latent_hw = (math.ceil(sample.shape[-2] / patch), math.ceil(sample.shape[-1] / patch))
        t = first_arg(call, "timestep")
        state.observe(0.0 if t is None else t)

    state.handles.append(model.register_forward_pre_hook(observe, with_kwargs=True))
    for name, blk in blocks:
        subs = []
        if cfg.merge_attn and getattr(blk, "attn1", None) is not None:
            subs.append(_Sublayer(blk.attn1, "hidden_states"))
        if cfg.merge_cross and getattr(blk, "attn2", None) is not None:
            subs.append(_Sublayer(blk.attn2, "hidden_states"))
        if cfg.merge_mlp and getattr(blk, "ff", None) is not None:
            subs.append(_Sublayer(blk.ff, "hidden_states"))
        if subs:
            _BlockMerger(state, name, subs, lambda n: _latent_grid(state, n))


def _wire_flux(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """FLUX / FLUX.2: the image stream of the double-stream blocks; grid from ``img_ids``."""
    cfg = state.cfg
    grid_box: dict[str, Any] = {"grid": None, "n": None}

    def observe(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = as_keywords(module, args, kwargs)
        hidden = first_arg(call, "hidden_states")
        grid_box["grid"] = grid_box["n"] = None
        ids = first_arg(call, "img_ids")
        if isinstance(ids, Tensor) and isinstance(hidden, Tensor):
            grid_box["grid"], grid_box["n"] = _ids_grid(ids[0] if ids.dim() == 3 else ids), hidden.shape[1]
        t = first_arg(call, "timestep")
        state.observe(0.0 if t is None else t)

    def grid(n: int) -> tuple[int, int] | None:
        return grid_box["grid"] if grid_box["n"] == n else None

    state.handles.append(model.register_forward_pre_hook(observe, with_kwargs=True))
    for name, blk in blocks:
        subs = []
        if cfg.merge_attn:
            subs.append(_Sublayer(blk.attn, "hidden_states", rope="flux", tuple_out=True))
        if cfg.merge_mlp and getattr(blk, "ff", None) is not None:
            subs.append(_Sublayer(blk.ff, "hidden_states"))
        if subs:
            _BlockMerger(state, name, subs, grid, shared=True)


def _ids_grid(ids: Tensor) -> tuple[int, int] | None:
    """``(h, w)`` if FLUX ids ``(N, 3)`` (T, H, W) or ``(N, 4)`` (T, H, W, L) are one row-major target grid.

    Anything else (reference tokens in the sequence, other layouts) returns ``None``: no merging.
    """
    if ids.dim() != 2 or ids.shape[1] not in (3, 4) or bool((ids[:, 0] != ids[0, 0]).any()):
        return None
    rows, cols = ids[:, 1].long(), ids[:, 2].long()
    rows, cols = rows - rows.min(), cols - cols.min()
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    if h * w != ids.shape[0] or not bool((rows * w + cols == torch.arange(h * w, device=ids.device)).all()):
        return None
    return h, w


def _unsupported(target: Any, method: str) -> TypeError:
    return TypeError(
        f"{method} expected a tokensparse RefDiT, a diffusers UNet or transformer built of "
        f"BasicTransformerBlock, a diffusers FLUX / FLUX.2 transformer, or a pipeline with .unet / "
        f".transformer; got {type(target).__name__}"
    )


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def apply_token_merging(target: Any, cfg: TokenMergingConfig) -> Any:
    """Merge similar tokens inside ``target``'s blocks (ToMe; CA-ToMe with ``threshold`` / ``recompute_*``).

    ``target``: a RefDiT, a diffusers UNet / FLUX / FLUX.2 transformer, or a pipeline holding one. Applying
    again replaces the earlier config; :func:`remove_token_merging` restores exact behaviour; an identity
    config (``ratio=0``, ``threshold > 1``) installs no merging at all. Returns ``target``.
    """
    if not isinstance(cfg, TokenMergingConfig):
        raise TypeError(f"cfg must be a TokenMergingConfig, got {type(cfg).__name__}")
    cfg = dataclasses.replace(cfg)  # a validated snapshot: later edits of the caller's object do not leak in
    model, pipe = _resolve(target)
    if model is None:
        raise _unsupported(target, "apply_token_merging")
    classes = _diffusers_classes() if not isinstance(model, RefDiT) else {}
    basic = [(n, m) for n, m in model.named_modules() if "basic" in classes and isinstance(m, classes["basic"])]
    flux_types = tuple(classes[k] for k in ("flux", "flux2") if k in classes)
    flux = [(n, m) for n, m in model.named_modules() if flux_types and isinstance(m, flux_types)]
    if not isinstance(model, RefDiT) and not basic and not flux:
        raise _unsupported(target, "apply_token_merging")

    remove_token_merging(target)
    state = TokenMergingState(cfg=cfg, model=model)
    model.__dict__[_STATE] = state
    state.owners = [model] + ([pipe] if pipe is not None else [])
    for owner in state.owners:
        on_generation_start(owner, _CALLBACK, state.new_generation)
    if cfg.is_identity:
        return target
    if isinstance(model, RefDiT):
        _wire_refdit(model, state)
    elif basic:
        _wire_unet(model, basic, state)
    else:
        _wire_flux(model, flux, state)
    state.handles.append(model.register_forward_hook(functools.partial(_report_no_grid, state)))
    return target


def _report_no_grid(state: TokenMergingState, module: nn.Module, args: tuple, output: Any) -> None:
    """Warn once when a model call had no block whose tokens this config can merge (a silent no-op)."""
    if state.grids_found == 0 and not state.warned:
        state.warned = True
        logger.warning(
            "tokensparse: token merging merged nothing in this %s call: no block's tokens form a grid it merges "
            "(UNets without attention at the top level, e.g. SDXL, need max_downsample=2; FLUX sequences with "
            "reference tokens are not merged)", type(module).__name__)


def remove_token_merging(target: Any) -> Any:
    """Undo :func:`apply_token_merging` (a no-op if it was never applied). Returns ``target``."""
    model, _ = _resolve(target)
    if model is None:
        raise _unsupported(target, "remove_token_merging")
    state: TokenMergingState | None = model.__dict__.pop(_STATE, None)
    if state is None:
        return target
    for handle in state.handles:
        handle.remove()
    state.handles.clear()
    for owner in state.owners:
        remove_generation_callback(owner, _CALLBACK)
    for module in model.modules():
        module.__dict__.pop("_tokensparse_active", None)
    return target
