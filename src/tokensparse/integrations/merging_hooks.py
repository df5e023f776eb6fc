"""Token merging wired into models through forward hooks (no class swaps, no copied forwards).

Supported targets (a pipeline is accepted too: its ``.transformer`` or ``.unet`` is patched):

- **RefDiT**: each ``RefDiTBlock.attn`` merges its target tokens ``x`` (average) and their RoPE table
  ``x_rope`` (each kept token keeps its own), and unmerges the target output; ``RefDiTBlock.mlp`` does the
  same when called with ``role="target"``. Context tokens are never merged (that is Sparse Context's job).
- **diffusers UNets** (SD-style, any model built of ``BasicTransformerBlock``): ``attn1`` / ``attn2`` / ``ff``
  merge their input tokens and unmerge their output, in blocks whose token grid is at most
  ``cfg.max_downsample`` times coarser than the latent.
- **diffusers FLUX / FLUX.2 transformers**: the target grid (found from ``img_ids``: the tokens with the lowest
  T id, at the start or the end of the image tokens) in every block: double-stream ``attn`` (with its RoPE
  rows) and ``ff``; single-stream ``attn`` (FLUX.2: attention and MLP fused) and FLUX.1's ``proj_mlp``. Text
  tokens and reference tokens (Kontext, FLUX.2 editing, FLUX.2's K/V-extract call) are never merged.

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
                 grid: Callable[[int], tuple[int, int, int] | None], shared: bool = False) -> None:
        self.state, self.name, self.grid, self.shared = state, name, grid, shared
        self.current: Matching | None = None
        self.span = (0, 0)  # (start, length) of the target grid in the sublayer's input: the tokens merged
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
                self.current = None
                if grid is not None:
                    self.span = (grid[2], grid[0] * grid[1])
                    self.current = self.state.matching(self.name, _part(x, self.span), grid[:2], self.shared)
            m, span = self.current, self.span
            if m is None or m.num_merged == 0 or not m.fits(_part(x, span)):
                return None
            module.__dict__["_tokensparse_active"] = (m, span)
            merged = _merge_span(m, x, span)
            if from_kwargs:
                kwargs = {**kwargs, sub.tokens: merged}
            else:
                args = (merged, *args[1:])
            if sub.rope == "refdit":  # (x, x_rope, ctx, ...): each kept token keeps its own rotation
                if len(args) > 1:
                    args = (args[0], _merge_span(m, args[1], span, mode="keep"), *args[2:])
                else:
                    kwargs = {**kwargs, "x_rope": _merge_span(m, kwargs["x_rope"], span, mode="keep")}
            elif sub.rope == "flux":
                kwargs = _flux_rope(kwargs, m, x.shape[1], span)
            return args, kwargs

        return hook

    def _post_hook(self, sub: _Sublayer) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            active = module.__dict__.pop("_tokensparse_active", None)
            if active is None:
                return None
            m, span = active
            if sub.tuple_out or isinstance(output, tuple):
                return (_unmerge_span(m, output[0], span), *output[1:])
            return _unmerge_span(m, output, span)

        return hook


def _part(x: Tensor, span: tuple[int, int]) -> Tensor:
    return x[:, span[0]:span[0] + span[1]]


def _merge_span(m: Matching, x: Tensor, span: tuple[int, int], mode: str = "mean") -> Tensor:
    """Merge the target grid ``x[:, start:start + n]``; tokens around it (references) pass as they are."""
    start, n = span
    if start == 0 and n == x.shape[1]:
        return m.merge(x, mode=mode)
    return torch.cat([x[:, :start], m.merge(x[:, start:start + n], mode=mode), x[:, start + n:]], 1)


def _unmerge_span(m: Matching, y: Tensor, span: tuple[int, int]) -> Tensor:
    """Inverse of :func:`_merge_span` on a sublayer's output, whose target part is ``n - merged`` rows long."""
    start, k = span[0], span[1] - m.num_merged
    if start == 0 and k == y.shape[1]:
        return m.unmerge(y)
    return torch.cat([y[:, :start], m.unmerge(y[:, start:start + k]), y[:, start + k:]], 1)


def _flux_rope(kwargs: dict, m: Matching, n_img: int, span: tuple[int, int]) -> dict:
    """Keep the RoPE rows of the text tokens, the kept target tokens and every reference token.

    FLUX's tables ``(S_txt + N, D)`` list the text first, then the image stream, in which the target grid
    is ``span`` (start, length) and any other rows are reference tokens. The tables have no batch
    dimension, so FLUX blocks use one matching per batch.
    """
    rope = kwargs.get("image_rotary_emb")
    if rope is None:
        return kwargs
    keep = m.keep[0]

    def sub(table: Tensor) -> Tensor:
        start = table.shape[0] - n_img + span[0]
        end = start + span[1]
        return torch.cat([table[:start], table[start:end][keep], table[end:]], dim=0)

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

    def grid(n: int) -> tuple[int, int, int] | None:
        return (side, side, 0) if n == side * side else None

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
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        out["flux"], out["flux_single"] = FluxTransformerBlock, FluxSingleTransformerBlock
    except ImportError:
        pass
    try:
        from diffusers.models.transformers.transformer_flux2 import (
            Flux2SingleTransformerBlock,
            Flux2TransformerBlock,
        )

        out["flux2"], out["flux2_single"] = Flux2TransformerBlock, Flux2SingleTransformerBlock
    except ImportError:
        pass
    return out


def _latent_grid(state: TokenMergingState, n: int) -> tuple[int, int, int] | None:
    """Grid ``(h, w, 0)`` of a UNet level with ``n`` tokens: the latent downsampled ``d`` times (ceil), ``d <= max``."""
    if state.latent_hw is None:
        return None
    h, w = state.latent_hw
    d = 1
    while d <= state.cfg.max_downsample:
        gh, gw = math.ceil(h / d), math.ceil(w / d)
        if gh * gw == n:
            return gh, gw, 0
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


def _wire_flux(model: nn.Module, double: list[tuple[str, nn.Module]], single: list[tuple[str, nn.Module]],
               state: TokenMergingState) -> None:
    """FLUX / FLUX.2: the target grid among the image tokens of every block, found from ``img_ids``.

    Double-stream blocks: ``attn`` (image stream) and ``ff``. Single-stream blocks, whose sequence is text
    then image tokens: FLUX.2's ``attn`` (attention and MLP fused in one sublayer; merged with
    ``merge_attn``), FLUX.1's ``attn`` and ``proj_mlp``. Text tokens, and reference tokens before or after
    the target (FLUX.1 Kontext and FLUX.2 put them after it, FLUX.2's K/V-extract call before it; thinned
    or not by Sparse Context), pass through unmerged.
    """
    cfg = state.cfg
    box: dict[str, Any] = {"grid": None, "n_txt": None}

    def observe(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = as_keywords(module, args, kwargs)
        ids, txt = first_arg(call, "img_ids"), first_arg(call, "encoder_hidden_states")
        box["grid"] = _ids_grid(ids[0] if ids.dim() == 3 else ids) if isinstance(ids, Tensor) else None
        box["n_txt"] = txt.shape[1] if isinstance(txt, Tensor) and txt.dim() == 3 else None
        t = first_arg(call, "timestep")
        state.observe(0.0 if t is None else t)

    def grid_after(text: bool) -> Callable[[int], tuple[int, int, int] | None]:
        def grid(n: int) -> tuple[int, int, int] | None:  # n: the sublayer's tokens (text first if ``text``)
            if box["grid"] is None or (text and box["n_txt"] is None):
                return None
            h, w, leading = box["grid"]
            lo = box["n_txt"] if text else 0
            return None if h * w > n - lo else (h, w, lo if leading else n - h * w)

        return grid

    state.handles.append(model.register_forward_pre_hook(observe, with_kwargs=True))
    for name, blk in double:
        subs = []
        if cfg.merge_attn:
            subs.append(_Sublayer(blk.attn, "hidden_states", rope="flux", tuple_out=True))
        if cfg.merge_mlp and getattr(blk, "ff", None) is not None:
            subs.append(_Sublayer(blk.ff, "hidden_states"))
        if subs:
            _BlockMerger(state, name, subs, grid_after(text=False), shared=True)
    for name, blk in single:
        subs = []
        if cfg.merge_mlp and isinstance(getattr(blk, "proj_mlp", None), nn.Module):  # FLUX.1: runs before attn
            subs.append(_Sublayer(blk.proj_mlp, "input"))
        if cfg.merge_attn:
            subs.append(_Sublayer(blk.attn, "hidden_states", rope="flux"))
        if subs:
            _BlockMerger(state, name, subs, grid_after(text=True), shared=True)


def _ids_grid(ids: Tensor) -> tuple[int, int, bool] | None:
    """The target grid in FLUX image ids ``(N, 3)`` (T, H, W) or ``(N, 4)`` (T, H, W, L): ``(h, w, leading)``.

    The target is the tokens with the lowest T id (0; reference tokens carry others: FLUX.1 Kontext 1,
    FLUX.2 10, 20, ...). They must be one row-major grid, at the start of the sequence (``leading``) or at
    its end, else ``None`` (no merging).
    """
    if ids.dim() != 2 or ids.shape[1] not in (3, 4) or ids.shape[0] == 0:
        return None
    is_target = ids[:, 0] == ids[:, 0].min()
    n = int(is_target.sum())
    if bool(is_target[:n].all()):
        leading, part = True, ids[:n]
    elif bool(is_target[-n:].all()):
        leading, part = False, ids[-n:]
    else:
        return None
    rows, cols = part[:, 1].long(), part[:, 2].long()
    rows, cols = rows - rows.min(), cols - cols.min()
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    if h * w != n or not bool((rows * w + cols == torch.arange(n, device=ids.device)).all()):
        return None
    return h, w, leading


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
    double_types = tuple(classes[k] for k in ("flux", "flux2") if k in classes)
    single_types = tuple(classes[k] for k in ("flux_single", "flux2_single") if k in classes)
    flux = [(n, m) for n, m in model.named_modules() if double_types and isinstance(m, double_types)]
    flux_single = [(n, m) for n, m in model.named_modules() if single_types and isinstance(m, single_types)]
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
        _wire_flux(model, flux, flux_single, state)
    state.handles.append(model.register_forward_hook(functools.partial(_report_no_grid, state)))
    return target


def _report_no_grid(state: TokenMergingState, module: nn.Module, args: tuple, output: Any) -> None:
    """Warn once when a model call had no block whose tokens this config can merge (a silent no-op)."""
    if state.grids_found == 0 and not state.warned:
        state.warned = True
        logger.warning(
            "tokensparse: token merging merged nothing in this %s call: no block's tokens form a grid it merges "
            "(UNets without attention at the top level, e.g. SDXL, need max_downsample=2; FLUX image tokens "
            "must start with one row-major target grid)", type(module).__name__)


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
