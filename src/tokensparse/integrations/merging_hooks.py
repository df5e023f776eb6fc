"""Token merging wired into models through forward hooks (no class swaps, no copied forwards).

Supported targets (a pipeline is accepted too: its ``.transformer`` or ``.unet`` is patched):

- **RefDiT**: each ``RefDiTBlock.attn`` merges its target tokens ``x`` (average) and their RoPE table
  ``x_rope`` (each kept token keeps its own), and unmerges the target output; ``RefDiTBlock.mlp`` does the
  same when called with ``role="target"``. Context tokens are never merged (that is Sparse Context's job).
- **diffusers** UNets and transformers (SD-style UNets, PixArt / DiT, SD3, FLUX / FLUX.2 / FLUX.3, Chroma,
  Ovis-Image, Bria 3.x, Bria FIBO, Fibo 2.0, Qwen-Image, Qwen-Image 2.1, Z-Image, Lumina 2, CogView4, GLM-Image,
  Sana, HunyuanDiT, AuraFlow, HiDream-I1, HunyuanImage 2.1, JoyImage Edit (Plus), OmniGen, CogView3-Plus,
  ERNIE-Image, PRX, Lumina-Next, Krea 2, Ideogram 4): see :mod:`.merging_diffusers`. Only the target's tokens merge;
  text and reference tokens pass through.

Per block, the first merged sublayer computes (or, between recompute steps, looks up) the matching from its
input; the block's later sublayers reuse it. A forward pre-hook on the model reads the timestep and feeds a
:class:`~tokensparse.generation.StepTracker`, which numbers the steps and notices a new generation when the
timestep rises; :func:`tokensparse.generation.begin_generation` (``tokensparse.generate`` calls it; for
pipelines ``scheduler.set_timesteps`` does) starts one explicitly. A call that cannot continue the generation
(another grid or grad mode at a new step, a switch of ``torch.inference_mode()``) starts one too
(:meth:`~.merging_core.TokenMergingState.observe`). Each new generation empties the match
cache. A layer's random destinations at a step depend only on the config's seed, the step and the layer, so every
pass of a step draws the same ones, as one batched call would. Calls at one timestep are the passes of a step
(guidance), told apart by a fingerprint of their arguments: an identical call gets its own matchings back.
A call whose samples are at different timesteps (a training batch) is a generation of its own: its matchings
are computed from its tokens, never reused from another call's.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import re
from typing import Any

from torch import Tensor, nn

from ..generation import compile_hint, on_generation_start, remove_generation_callback, reset_if_compiled
from ..merging import Matching, TokenMergingConfig
from ..models.refdit import RefDiT
from .calls import as_keywords, first_arg
from .classes import known_name
from .merging_blocks import Sublayer, merge_block
from .merging_conflicts import refuse_output_caches
from .merging_core import TokenMergingState, observe_calls
from .merging_diffusers import find_blocks, wire
from .merging_spans import merge_span

__all__ = ["TokenMergingState", "apply_token_merging", "merging_state", "merging_supports", "remove_token_merging"]

logger = logging.getLogger(__name__)

_STATE = "_tokensparse_token_merging"
_VIDEO = re.compile(r"3D|Motion|Temporal|Video|I2VGenXL")  # diffusers video UNets / DiTs built of image blocks
# modules that only video models hold (AnimateDiff motion modules, temporal transformers, 3-D blocks); narrower
# than _VIDEO, which would also match image models' parts (e.g. QwenEmbedLayer3DRope, Kandinsky3DownSampleBlock)
_VIDEO_PART = re.compile(r"Motion|SpatioTemporal|Temporal\w*Transformer|TransformerTemporal|Transformer3D|Block3D")
# image models named like video ones: JoyImage Edit stacks the target and its references on the frame axis
_NOT_VIDEO = ("JoyImageEditTransformer3DModel", "JoyImageEditPlusTransformer3DModel")
_CALLBACK = "token_merging"


def merging_state(target: Any) -> TokenMergingState | None:
    """The :class:`TokenMergingState` of a patched model or pipeline, or ``None``."""
    model = _resolve(target)[0] if target is not None else None
    return None if model is None else _find_state(model)


def _holders(model: nn.Module) -> list[nn.Module]:
    """``model`` and, for a ``torch.compile(model)`` wrapper, the model it wraps: token merging applied through
    either is the other's too (``pipe.unet = torch.compile(pipe.unet)`` after applying it to ``pipe``)."""
    inner = getattr(model, "_orig_mod", None)
    return [model, inner] if isinstance(inner, nn.Module) else [model]


def _find_state(model: nn.Module) -> TokenMergingState | None:
    """The state of the merging applied to ``model``, to the model it wraps, or to a wrapper of it."""
    return next((m.__dict__[_STATE] for m in _holders(model) if _STATE in m.__dict__), None)


def _resolve(target: Any) -> tuple[nn.Module | None, Any]:
    """(model to patch, pipeline or None)."""
    if isinstance(target, nn.Module):
        return target, None
    for attr in ("transformer", "unet"):
        model = getattr(target, attr, None)
        if isinstance(model, nn.Module):
            return model, target
    return None, None


def _refdit_rope(args: tuple, kwargs: dict, m: Matching, n: int, span: tuple[int, int]) -> tuple[tuple, dict]:
    """RefDiT attention ``(x, x_rope, ctx, ...)``: each kept target token keeps its own rotation."""
    if len(args) > 1:
        return (args[0], merge_span(m, args[1], span, mode="keep"), *args[2:]), kwargs
    return args, {**kwargs, "x_rope": merge_span(m, kwargs["x_rope"], span, mode="keep")}


def _square_grid(side: int, n: int) -> tuple[int, int, int] | None:
    return (side, side, 0) if n == side * side else None


def _observe_refdit(state: TokenMergingState, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    x = call.get("x")
    state.observe(first_arg(call, "t"), call, tuple(x.shape[1:]) if isinstance(x, Tensor) else None)


def _wire_refdit(model: RefDiT, state: TokenMergingState) -> None:
    """Partials, not closures, like :mod:`.merging_diffusers`: ``copy.deepcopy`` copies them with the state."""
    grid = functools.partial(_square_grid, model.config.grid)
    observe_calls(model, state, _observe_refdit)
    for i, blk in enumerate(model.blocks):
        merge_block(state, f"blocks.{i}", Sublayer(blk.attn, "x", rope=_refdit_rope),
                    Sublayer(blk.mlp, "x", target_only=True), grid)


def _has_cross_attention(blocks: dict[str, list[tuple[str, nn.Module]]]) -> bool:
    """Whether any UNet-kind block (``BasicTransformerBlock``), Sana or HunyuanDiT block has a cross-attention
    ``attn2`` to merge, or any Fibo 2.0 block (its injection blocks) a ``cross_attention``."""
    return any(hasattr(blk, "attn1") and getattr(blk, "attn2", None) is not None
               for kind in ("unet", "sana", "hunyuan_dit") for _, blk in blocks.get(kind, [])) or any(
        getattr(blk, "cross_attention", None) is not None for _, blk in blocks.get("fibo2", []))


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def _attention_holders(model: nn.Module, limit: int = 4) -> list[str]:
    """The class names (distinct, in module order, at most ``limit``) of the blocks holding ``model``'s attention
    modules (those whose class name ends in ``Attention``): the nearest ancestor that is not a container."""
    parents: dict[int, nn.Module] = {}
    names: list[str] = []
    for module in model.modules():
        for child in module.children():
            parents[id(child)] = module
        if module is model or not type(module).__name__.endswith("Attention"):
            continue
        holder = parents.get(id(module))
        while isinstance(holder, _CONTAINERS):
            holder = parents.get(id(holder))
        if holder is None or (holder is not model and type(holder).__name__.endswith("Attention")):
            continue  # an attention module inside another (its processor, a sub-attention): counted with it
        name = type(holder).__name__
        if name not in names:
            names.append(name)
            if len(names) == limit:
                break
    return names


def _unsupported(target: Any, method: str, model: nn.Module | None = None) -> TypeError:
    got = type(target).__name__
    if model is not None and model is not target:  # a pipeline whose model is not one merging knows
        got = f"{got}, whose model is a {type(model).__name__}"
    why, hint = "", compile_hint(target, lambda m: merging_supports(m) is None)
    if model is None and not isinstance(target, nn.Module):  # a pipeline whose model is not loaded yet
        empty = [a for a in ("transformer", "unet") if hasattr(target, a) and getattr(target, a) is None]
        if empty:
            why = (f", whose .{empty[0]} is None (not loaded: load it first, e.g. a modular pipeline's "
                   f"pipe.load_components() or pipe.update_components({empty[0]}=...))")
    # a model it does not know (not a torch.compile wrapper): where its attention is, so the reason is visible
    if model is not None and not hint and not hasattr(model, "_orig_mod"):
        holders = _attention_holders(model)
        why = (f" with its attention in {', '.join(holders)} (blocks token merging does not know)" if holders
               else " with no attention module")
    return TypeError(
        f"{method} expected a tokensparse RefDiT, a diffusers UNet or transformer built of "
        f"BasicTransformerBlock, an SD3 / FLUX / FLUX.2 / FLUX.3 / LongCat-Image / Chroma / Ovis-Image / Bria / "
        f"Bria FIBO / Fibo 2.0 / Qwen-Image / Qwen-Image 2.1 / Z-Image / Lumina 2 / CogView4 / GLM-Image / Sana / "
        f"HunyuanDiT / AuraFlow / HiDream-I1 / HunyuanImage 2.1 / JoyImage Edit (Plus) / OmniGen / CogView3-Plus / "
        f"ERNIE-Image / PRX / Lumina-Next / Krea 2 / Ideogram 4 transformer, or a pipeline with .unet / .transformer "
        f"holding one; got {got}{why}{hint}"
    )


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def apply_token_merging(target: Any, cfg: TokenMergingConfig) -> Any:
    """Merge similar tokens inside ``target``'s blocks (ToMe; CA-ToMe with ``threshold`` / ``recompute_*``).

    ``target``: a RefDiT, a diffusers UNet / SD3 / FLUX / FLUX.2 / FLUX.3 / LongCat-Image / Chroma / Ovis-Image /
    Bria / Bria FIBO / Fibo 2.0 / Qwen-Image(-Layered) / Qwen-Image 2.1 / Z-Image / Lumina 2 / CogView4 /
    GLM-Image / Sana / HunyuanDiT / AuraFlow / HiDream-I1 / HunyuanImage 2.1 / JoyImage Edit (Plus) / OmniGen /
    CogView3-Plus / ERNIE-Image / PRX / Lumina-Next / Krea 2 / Ideogram 4 transformer, or a pipeline (FLUX.3:
    modular) holding one (Ideogram 4: its ``.transformer``; its ``unconditional_transformer`` is a model of its own).
    Applying again replaces the earlier config; :func:`remove_token_merging` restores exact behaviour; an
    identity config (``ratio=0``, ``threshold > 1``) installs no merging at all. Returns ``target``.

    ``TypeError`` for a target it cannot merge: an unknown model (the message names the blocks holding its
    attention, e.g. Kandinsky 2.2's and DeepFloyd IF's ``SimpleCrossAttnDownBlock2D``), a video model, a model whose
    ``forward`` takes no latent (aMUSEd; VQ-Diffusion's codebook ids).
    ``ValueError`` for a config that would merge an attention map ``target``'s pipeline reads
    (``StableDiffusionSAGPipeline``; ``merge_cross=True`` with ``StableDiffusionAttendAndExcitePipeline``,
    ``StableDiffusionPix2PixZeroPipeline``, the LEdits++ pipelines), or for a model with a diffusers cache on a
    sublayer it would merge (``enable_cache`` with Pyramid Attention Broadcast, FasterCache, TaylorSeer: they reuse the
    sublayer's merged output of an earlier step; a model call raises it too, for a cache enabled after this); a failed
    apply leaves the earlier state as it was.
    """
    if not isinstance(cfg, TokenMergingConfig):
        raise TypeError(f"cfg must be a TokenMergingConfig, got {type(cfg).__name__}")
    cfg = dataclasses.replace(cfg)  # a validated snapshot: later edits of the caller's object do not leak in
    model, pipe = _resolve(target)
    if model is None:
        raise _unsupported(target, "apply_token_merging")
    blocks = _supported_blocks(model, target, "apply_token_merging")
    if pipe is not None and not cfg.is_identity:
        _check_pipeline(pipe, model, cfg)
    # checked before the current config is removed: a failed apply changes nothing
    if not cfg.is_identity and not (cfg.merge_attn or cfg.merge_mlp or _has_cross_attention(blocks)):
        raise ValueError(
            f"this TokenMergingConfig merges no sublayer of {type(model).__name__} (merge_attn=False, "
            "merge_mlp=False, merge_cross=True): cross-attention exists only in UNet / PixArt-style, Sana, "
            "HunyuanDiT and Fibo 2.0 blocks; enable merge_attn or merge_mlp")
    if not cfg.is_identity and not isinstance(model, RefDiT):
        _refuse_output_caches(model, blocks, cfg)

    unwired = _unwire(model, target)
    state = TokenMergingState(cfg=cfg, model=model)
    for holder in _holders(model):  # a wrapper's state is its model's too: removing through either removes it
        holder.__dict__[_STATE] = state
    state.owners = [model] + ([pipe] if pipe is not None else [])
    for owner in state.owners:
        on_generation_start(owner, _CALLBACK, state.new_generation)
    if cfg.is_identity:
        if unwired:
            reset_if_compiled(model, "token merging")
        return target
    if isinstance(model, RefDiT):
        _wire_refdit(model, state)
    else:
        wire(model, blocks, state)
    state.handles.append(model.register_forward_hook(functools.partial(_report_no_grid, state)))
    reset_if_compiled(model, "token merging")
    return target


def _refuse_output_caches(model: nn.Module, blocks: dict, cfg: TokenMergingConfig) -> None:
    """``ValueError`` where a diffusers cache (Pyramid Attention Broadcast, FasterCache, TaylorSeer) or Smoothed Energy
    Guidance's hook is on a sublayer ``cfg`` would merge (:func:`.merging_conflicts.refuse_output_caches`): wired into a
    throwaway state, whose hooks are removed at once (the model's current merging stays as it is)."""
    probe = TokenMergingState(cfg=cfg, model=model)
    try:
        wire(model, blocks, probe)
    finally:
        for handle in probe.handles:
            handle.remove()
    refuse_output_caches(model, probe.sublayers)


def _report_no_grid(state: TokenMergingState, module: nn.Module, args: tuple, output: Any) -> None:
    """Warn once when a model call had no block whose tokens this config can merge (a silent no-op)."""
    if state.grids_found == 0 and not state.warned:
        state.warned = True
        logger.warning(
            "tokensparse: token merging merged nothing in this %s call: no block's tokens form a grid it merges "
            "(UNets without attention at the top level, e.g. SDXL, need max_downsample=2; FLUX / Qwen-Image: "
            "apply it to the transformer or pipeline, whose img_ids / img_shapes locate the target, and the "
            "target tokens must be one row-major grid, at least 2x2, before or after the reference tokens)",
            type(module).__name__)


def remove_token_merging(target: Any) -> Any:
    """Undo :func:`apply_token_merging` (a no-op if it was never applied). Returns ``target``.

    Raises ``TypeError`` for a target :func:`apply_token_merging` does not support."""
    model, pipe = _resolve(target)
    if model is None:
        raise _unsupported(target, "remove_token_merging")
    if _unwire(model, target):
        reset_if_compiled(model, "token merging")
    if pipe is not None:  # e.g. an unpickled pipeline: its state no longer lists the pipeline among its owners
        remove_generation_callback(pipe, _CALLBACK)
    return target


def merging_supports(model: nn.Module) -> str | None:
    """``None`` where :func:`apply_token_merging` takes ``model``, else why not (the ``TypeError`` it would raise):
    a pre-flight check, e.g. on a model built on the meta device from its config."""
    try:
        _supported_blocks(model, model, "apply_token_merging")
    except TypeError as exc:
        return str(exc)
    return None


def _supported_blocks(model: nn.Module, target: Any, action: str) -> dict:
    """``find_blocks(model)`` (``{}`` for RefDiT); ``TypeError`` for a model token merging does not support."""
    if isinstance(model, RefDiT):
        return {}
    blocks = find_blocks(model)
    if not any(found for kind, found in blocks.items() if kind != "flux_single"):  # wire() starts from the others
        raise _unsupported(target, action, model)
    # the model's class or a base of it (a subclass of a video model), else a part's (or a base of a part's)
    video = None if known_name(type(model), _NOT_VIDEO) else known_name(type(model), _VIDEO) or next(
        (type(m).__name__ for m in model.modules() if known_name(type(m), _VIDEO_PART)), None)
    if video is not None:  # the model itself, or its motion modules (e.g. SparseControlNetModel)
        raise TypeError(f"token merging does not support video models ({type(model).__name__}, built with "
                        f"{video}): their tokens span frames, and it merges within one image's token grid")
    if blocks["unet"] and not _takes_latent(model):
        name = type(model).__name__
        raise TypeError(f"token merging does not support {name}: it merges the token grid of a latent passed as "
                        f"sample / hidden_states, and {name}.forward takes neither (aMUSEd's UVit2DModel takes token "
                        "ids)")
    if blocks["unet"] and known_name(type(model), ("PriorTransformer",)):
        raise TypeError(f"token merging does not support {type(model).__name__} (the unCLIP / Kandinsky prior): its "
                        "tokens are a few text and image embeddings, not an image's token grid, so nothing would "
                        "merge")
    if blocks["unet"] and getattr(getattr(model, "config", None), "num_vector_embeds", None) is not None:
        raise TypeError(f"token merging does not support a {type(model).__name__} with num_vector_embeds (discrete "
                        "input, VQDiffusionPipeline): its hidden_states are ids of VQ codebook entries, not a latent "
                        "whose token grid it merges")
    return blocks


def _takes_latent(model: nn.Module) -> bool:
    """Whether ``model.forward`` has a ``sample`` or ``hidden_states`` parameter (UNet-kind models: the latent)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read: let the call-time check warn instead
        return True
    return "sample" in params or "hidden_states" in params or any(
        p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values())


_LEDITS = "takes the cross-attention maps of the latent's 1/4-size level for its edit masks (use_cross_attn_mask)"
# pipelines that read the cross-attention maps of the UNet's latent tokens: what they do with them
_CROSS_MAP_READERS = {
    "StableDiffusionAttendAndExcitePipeline": "reads the cross-attention maps over every latent token",
    "StableDiffusionPix2PixZeroPipeline": "compares each step's cross-attention maps with those of its reference "
                                          "pass, token by token",
    "LEditsPPPipelineStableDiffusion": _LEDITS,
    "LEditsPPPipelineStableDiffusionXL": _LEDITS,
}
# pipelines that read attention maps merging would thin (refused with the configs that would): by their MRO
_ATTENTION_MAP_PIPELINES = (*_CROSS_MAP_READERS, "StableDiffusionSAGPipeline")


def _check_pipeline(pipe: Any, model: nn.Module, cfg: TokenMergingConfig) -> None:
    """``ValueError`` where ``pipe`` reads attention maps that ``cfg`` would merge (it would fail inside the call, or
    read the maps of other tokens)."""
    name, kind = type(pipe).__name__, known_name(type(pipe), _ATTENTION_MAP_PIPELINES)  # kind: a subclass's base
    if kind in _CROSS_MAP_READERS and cfg.merge_cross:
        raise ValueError(f"cfg.merge_cross=True does not work with {name}: it {_CROSS_MAP_READERS[kind]}, which "
                         "merging would thin; use merge_cross=False")
    if kind == "StableDiffusionSAGPipeline" and cfg.merge_attn:
        mid = 2 ** sum(1 for blk in getattr(model, "down_blocks", []) if getattr(blk, "downsamplers", None))
        if cfg.max_downsample >= mid:
            raise ValueError(f"cfg.max_downsample={cfg.max_downsample} merges the self-attention of the UNet's mid "
                             f"block (its tokens {mid}x coarser than the latent), whose attention map {name} reads; "
                             f"use max_downsample < {mid} or merge_attn=False")


def _unwire(model: nn.Module, target: Any) -> bool:
    """Remove the merging state and hooks from ``model`` (``target``'s); whether any hooks were removed."""
    state = _find_state(model)
    if state is None:
        _supported_blocks(model, target, "remove_token_merging")  # raises as apply_token_merging would
        return False
    for holder in _holders(state.model):  # applied through a torch.compile wrapper: the model it wraps holds it too
        holder.__dict__.pop(_STATE, None)
    hooked = bool(state.handles)
    for handle in state.handles:
        handle.remove()
    state.handles.clear()
    for owner in state.owners:
        remove_generation_callback(owner, _CALLBACK)
    for module in model.modules():
        module.__dict__.pop("_tokensparse_active", None)
        module.__dict__.pop("_tokensparse_hw", None)
    return hooked
