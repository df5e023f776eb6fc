"""Sparse Context for diffusers pipelines: feed the transformer a subset of each reference's tokens.

Supported: ``Flux2KleinPipeline``, ``Flux2Pipeline``, ``Flux2KleinKVPipeline`` (FLUX.2),
``FluxKontextPipeline`` (FLUX.1 Kontext), ``QwenImageEditPlusPipeline``, ``QwenImageEditPipeline``,
``QwenImage21Pipeline`` (Qwen-Image 2.1), ``QwenImageLayeredPipeline`` (its input image; every target layer stays
whole), ``LongCatImageEditPipeline``, ``BriaFiboEditPipeline``,
``BriaFibo2Pipeline`` (Fibo 2.0), ``ZImageOmniPipeline``, ``JoyImageEditPipeline``, ``JoyImageEditPlusPipeline``,
``GlmImagePipeline`` (GLM-Image), ``OmniGenPipeline``, ``VisualClozeGenerationPipeline`` / ``VisualClozePipeline``
(its in-context example rows) and the inpainting ``Flux2KleinInpaintPipeline`` / ``FluxKontextInpaintPipeline`` /
``QwenImageEditInpaintPipeline``, or their bare transformers; the FLUX.1 Redux prior ``FluxPriorReduxPipeline`` (its
image tokens, thinned where it makes them: :mod:`.diffusers_redux`); and subclasses of any of them, which run as their
nearest supported base class (:mod:`.classes`: e.g. ``class MyKontext(FluxKontextPipeline)`` overriding
``__call__``, or a transformer with an extra method).

How it works. A forward pre-hook on the transformer finds the reference tokens in the image
sequence of every call (see :mod:`.diffusers_models`), keeps the ones the configured selector picks,
and subsets ``hidden_states`` together with their position ids, so RoPE still places every kept token
where it came from. Target and text tokens are untouched. The output is scattered back to the dense
sequence length (dropped reference positions are zero), so the pipeline's ``noise_pred[:, :n_target]``
slicing and any caller expecting the dense shape keep working. Transformers that build their token sequence
inside ``forward`` (Z-Image Omni, JoyImage, Fibo 2.0, Qwen-Image 2.1) are thinned where they build it, by
companion hooks their adapter registers (:class:`.diffusers_layout.InContextAdapter`).
OmniGen's rows place their images at different places and its RoPE is row 0's: each row is thinned on
its own, and its attention runs row by row (:mod:`.diffusers_omnigen`).

The selection is computed once per generation and reused by every step and every guidance pass:
on a pipeline, a new generation starts when the pipeline calls ``scheduler.set_timesteps`` (once per
call); on a bare transformer, when the timestep rises. The batch shares one selection because the
transformers take one set of position ids for the whole batch (FLUX uses ``img_ids[0]``); it is
computed from the first sample's references and prompt (``selector="auto"`` picks its scorer by the first prompt's
task for every sample; a batch of different prompts logs a warning once). When the pipeline is given the reference
images as pixels, scorers also see them (``RefView.image``). ``ts.begin_generation(pipe or transformer)`` starts one
explicitly.

With ``Flux2KleinKVPipeline`` the K/V-extract step sees only the kept references, so the cache holds
fewer reference K/V and every later step attends to fewer keys (sparse + cache). ``QwenImage21Pipeline``'s own
prefix K/V cache (``use_kv_cache=True``, its default) likewise holds the kept tokens only.

GLM-Image always caches: its condition images' K/V are written by one transformer call each before the denoising
loop; those calls are thinned, each selected on its own (:class:`.diffusers_glm_image.GlmImageAdapter`).

``proportional=True`` (FLUX.2, FLUX.1 Kontext / VisualCloze, OmniGen; :mod:`.diffusers_proportional`): alongside
the selection, each dropped reference token goes to the nearest kept token of its reference (L2 over the selection's
latent features), and each kept one's ``log(size)`` is added to its attention logits: through
``joint_attention_kwargs["attention_mask"]``, a float ``(1, 1, 1, S_txt + K)`` mask that every double- and
single-stream attention adds (text first, then the image tokens, in both); for OmniGen, through its own per-row
mask, made additive. It is refused with the K/V cache
(``Flux2KleinKVPipeline``: its K/V processors drop the mask), for Qwen-Image-Edit (its processor refuses an
external mask), for LongCat-Image-Edit, JoyImage Edit (Plus) and Fibo 2.0 (no attention kwargs reach their
attention), for Bria FIBO Edit (its pipeline passes its own padding mask), for Z-Image Omni and Qwen-Image 2.1
(their attention gets only the masks they build), for GLM-Image (its processor takes a text padding mask only),
with a caller's own ``attention_mask``, and under attention backends that do not add a float mask (flash, sage,
varlen, ...).

A call without reference tokens (text-to-image) runs unchanged and logs a warning once per generation.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import torch
from torch import Tensor

from ..context import SparseContextConfig, keep_mask
from ..generation import (
    StepTracker,
    check_scheduler,
    copy_keeping_copied_owners,
    on_generation_start,
    remove_generation_callback,
    reset_if_compiled,
    state_without_pipelines,
)
from ..selection import RefView, needs_probe
from .calls import as_keywords, positional_names
from .classes import known_name
from .diffusers_capture import captured_inputs, unwrap_capture, wrap_capture
from .diffusers_layout import BlockReplay, InContextAdapter
from .diffusers_models import (
    KV_PIPELINES,
    PIPELINES,
    TRANSFORMERS,
    RefLayout,
    adapter_class,
    pipeline_name,
    transformer_name,
)
from .diffusers_proportional import (
    check_attention,
    check_call,
    check_supported,
    image_bias,
    sequence_sizes,
)
from .diffusers_redux import REDUX_PIPELINES, ReduxState, apply_redux, is_redux, redux_state, remove_redux

logger = logging.getLogger(__name__)

_HOOK = "_tokensparse_sparse_context"  # the transformer's SparseContextHook, in its __dict__
_CALLBACK = "tokensparse_sparse_context"


def is_diffusers_target(obj: Any) -> bool:
    """True for any diffusers pipeline or model (without importing diffusers)."""
    return any(c.__module__.split(".")[0] == "diffusers" for c in type(obj).__mro__)


def _supported() -> str:
    return (f"pipelines {sorted(PIPELINES)}, the prior {list(REDUX_PIPELINES)} or transformers {sorted(TRANSFORMERS)}, "
            "or subclasses of them")


def _resolve(target: Any) -> tuple[Any | None, torch.nn.Module]:
    """``(pipeline or None, transformer)``; ``TypeError`` naming what is supported otherwise. Subclasses of supported
    pipelines and transformers are supported as their base (:func:`.diffusers_models.pipeline_name`)."""
    name = type(target).__name__
    if pipeline_name(target) is not None:
        transformer = getattr(target, "transformer", None)
        if transformer is None or transformer_name(transformer) is None:
            hint = ("; compile in place with pipe.transformer.compile() instead of replacing it with torch.compile(...)"
                    if known_name(type(transformer), ("OptimizedModule",)) else "")
            raise TypeError(f"{name} has no supported transformer ({type(transformer).__name__}){hint}")
        return target, transformer
    if transformer_name(target) is not None:
        return None, target
    modular = _modular_refusal(target)
    if modular is not None:
        raise TypeError(modular)
    raise TypeError(f"Sparse Context does not support {name}; expected {_supported()}")


def _modular_refusal(target: Any) -> str | None:
    """What to do instead, for a diffusers modular pipeline or its blocks (``None`` for anything else).

    Modular pipelines assemble their call from blocks, so there is no fixed method to capture the reference
    pixels and prompt from; their transformer is one of the supported ones and takes the same inputs, so
    Sparse Context applied to the transformer thins their calls like a bare transformer's.
    """
    name = type(target).__name__
    if known_name(type(target), ("ModularPipelineBlocks",)) is not None:
        return (f"Sparse Context does not take modular pipeline blocks ({name}); build the pipeline "
                "(pipe = blocks.init_pipeline(...), then load its components) and apply it to pipe.transformer")
    if known_name(type(target), ("ModularPipeline",)) is None:
        return None
    transformer = getattr(target, "transformer", None)
    if transformer is None:
        how = "load its transformer first (pipe.load_components() or pipe.update_components(transformer=...)), "
    elif transformer_name(transformer) is None:
        return (f"Sparse Context does not support diffusers modular pipelines ({name}), nor their transformer "
                f"({type(transformer).__name__}); expected {_supported()}")
    else:
        how = ""
    return (f"Sparse Context does not take diffusers modular pipelines ({name}) as a pipeline: {how}apply it to "
            "the pipeline's transformer instead, ts.apply_sparse_context(pipe.transformer, cfg) (remove it with "
            "ts.remove_sparse_context(pipe.transformer)); the selection then sees the references' latents instead "
            "of their pixels, and no prompt")


class _State:
    """Per-generation selection state, shared by the transformer hook and the pipeline wrappers."""

    def __init__(self, cfg: SparseContextConfig) -> None:
        self.cfg = cfg
        self.images: list[Tensor] | None = None  # reference pixels captured from the pipeline, [0, 1]
        self.images_tick = -1  # value of `forwards` when the images were captured
        # per-sample pipelines (JoyImage): whether the captured images are the same for every sample of the batch
        self.images_shared = False
        self.prompts: list[str] | None = None  # the call's (positive) prompts, for prompt-aware scorers
        self.prompts_tick = -1
        self.forwards = 0  # transformer calls seen
        self.index: dict[tuple, tuple[Tensor, RefLayout] | None] = {}  # per sequence layout: kept positions
        self.probes: dict[tuple, tuple[Tensor, Tensor]] = {}  # per layout: (positions, their tokens) at selection
        self.selections = 0  # number of selections computed (tests: once per generation)
        # proportional: per layout, (size of each dense image token, log-size bias over the kept ones or None)
        self.sizes: dict[tuple, tuple[Tensor, Tensor | None]] = {}
        self.warned_processor = False
        self.warned = False
        self.warned_batch = False
        self.warned_uncaptured = False
        self.warned_count = False
        self.warned_prompts = False
        # what the running thinned call tells its adapter's companion hooks (None outside one), set by the adapter's
        # subset: Qwen-Image-Edit's pos_embed hook (dense img_shapes, kept index), JoyImage's blocks their RoPE,
        # Z-Image's KeptPatches (kept index, dense image tokens), OmniGen's rows, Fibo 2.0's / Qwen-Image 2.1's call
        self.call: Any = None
        self.replay = BlockReplay()  # what block-level companion hooks read, for gradient checkpointing's recompute
        self.tracker = StepTracker()

    def clear_call(self) -> None:
        """Outside a thinned call: the companion hooks pass everything through."""
        self.call = None

    def new_generation(self) -> None:
        self.index.clear()
        self.probes.clear()
        self.sizes.clear()
        self.warned = False


class SparseContextHook:
    """Forward pre-hook and hook on the transformer: subsets the reference tokens and their ids before the
    call, scatters the output back to the dense length after it.

    PyTorch module hooks (``register_forward_pre_hook`` / ``register_forward_hook``, bound methods): they run
    around whatever wraps ``forward`` (accelerate's offloading, diffusers' own hooks), and ``copy.deepcopy``
    of the model copies them with their state. Like all module hooks they act on ``transformer(...)`` calls,
    not on ``transformer.forward(...)``; pre-hooks registered after this one see the thinned call.
    """

    def __init__(self, cfg: SparseContextConfig, adapter: InContextAdapter, owners: list[Any]) -> None:
        self.state = _State(cfg)
        self.adapter = adapter
        self.owners = owners  # the pipelines it was applied through: their calls are captured, start generations
        self.handles: list[Any] = []
        self._current: tuple[Tensor, RefLayout] | None = None  # (kept index, layout) of the running call

    def __deepcopy__(self, memo: dict) -> SparseContextHook:
        return copy_keeping_copied_owners(self, memo)

    def __getstate__(self) -> dict:
        return state_without_pipelines(self)

    def attach(self, transformer: torch.nn.Module) -> None:
        self.handles += [transformer.register_forward_pre_hook(self.pre_forward, with_kwargs=True),
                         # first of the forward hooks: any other sees the dense output
                         transformer.register_forward_hook(self.post_forward, with_kwargs=True, prepend=True)]
        try:
            self.handles += self.adapter.attach(transformer, self.state)  # companion hooks (Qwen's pos_embed, ...)
        except Exception:
            self.detach(transformer)  # refused (a diffusers version it does not know): no hook left behind
            raise
        transformer.__dict__[_HOOK] = self

    def detach(self, transformer: torch.nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        transformer.__dict__.pop(_HOOK, None)

    def pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The call with the kept reference tokens (arguments stay positional or keyword as given), or ``None``
        (unchanged)."""
        self._current = None
        self.state.clear_call()
        if self.state.cfg.is_identity:
            return None
        call = self._subset(module, as_keywords(module, args, kwargs))
        if call is None:
            return None
        return tuple(call.pop(name) for name in positional_names(module, len(args))), call

    def _subset(self, module: torch.nn.Module, kwargs: dict) -> dict | None:
        self.state.replay.start(module)
        for owner in self.owners:
            if _shares(owner, module):
                check_scheduler(owner)  # a scheduler swapped after apply: this call starts a generation
        t = self.adapter.timestep(kwargs)
        if t is not None:  # also catches pipelines sharing this transformer (from_pipe)
            gen = self.state.tracker.generation
            self.state.tracker.observe(t)
            if self.state.tracker.generation != gen:
                self.state.new_generation()
        if self.state.cfg.proportional:
            check_call(kwargs)  # a K/V-cache call: the bias cannot reach its attention
        if self.adapter.is_kv_cached_call(kwargs):
            return None  # K/V of the kept references were cached at the extract step
        hs = self.adapter.tokens(kwargs)
        key = (tuple(hs.shape[1:]), self.adapter.cache_mode(kwargs))
        if self.adapter.fresh_references(kwargs):
            self.state.new_generation()  # GLM-Image: every condition-image write call is selected on its own
        elif key in self.state.index and not self._same_references(key, hs):
            self.state.new_generation()  # new references without a visible boundary (bare transformer, 1 step)
        if key not in self.state.index:
            entry = self._select(kwargs, key, hs)
            if key in self.state.sizes:  # proportional: the attention must add the bias (checked per selection)
                check_attention(module, self.state)
            self.state.index[key] = entry
        self.state.forwards += 1
        entry = self.state.index[key]
        if entry is None:
            if not self.state.warned and self.adapter.warns_without_references:
                logger.warning("tokensparse: no reference tokens in this call; Sparse Context is a no-op")
                self.state.warned = True
            return None
        index, layout = entry
        self._current = (index, layout)
        call = self.adapter.subset(kwargs, index, layout, self.state)
        bias = self.state.sizes[key][1] if key in self.state.sizes else None
        return call if bias is None else self.adapter.with_bias(call, bias)

    def post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        current, self._current = self._current, None
        try:
            return output if current is None else self.adapter.scatter(output, *current)
        finally:
            self.state.clear_call()

    # selection --------------------------------------------------------------------------------------
    def _same_references(self, key: tuple, hs: Tensor) -> bool:
        """Whether the reference tokens the selection of ``key`` was computed from are still the input's.

        Reference latents are the same tensor values at every step of a generation, so a change means new
        references even where no generation boundary was seen (a swapped scheduler, one-step calls).
        """
        probe = self.state.probes.get(key)
        return probe is None or torch.equal(hs[:1, probe[0]], probe[1])

    def _select(self, kwargs: dict[str, Any], key: tuple, hs: Tensor) -> tuple[Tensor, RefLayout] | None:
        layout = self.adapter.layout(kwargs)
        if layout is None:
            return None
        ref_pos = torch.cat([p.to(hs.device) for p in layout.positions])
        probe_pos = ref_pos[:: max(1, ref_pos.numel() // 256)]  # <= ~256 tokens fingerprint the references
        self.state.probes[key] = (probe_pos, hs[:1, probe_pos].clone())
        # JoyImage Edit samples each sample's reference latents from the VAE posterior: the images it got tell
        shared = self.state.images_shared and self.state.images_tick == self.state.forwards
        if hs.shape[0] > 1 and not self.state.warned_batch and not shared and not all(
            torch.equal(hs[i, probe_pos], hs[0, probe_pos]) for i in range(1, hs.shape[0])
        ):
            logger.warning(
                "tokensparse: the samples of this batch have different references; all use the selection "
                "computed from the first sample's (the transformer takes one set of positions per batch)"
            )
            self.state.warned_batch = True
        inputs = self.adapter.call_inputs(self.state, kwargs)  # GLM-Image reads its own; others the pipeline's
        images, prompts, captured = inputs if inputs is not None else captured_inputs(self.state, len(layout.grids))
        _warn_first_prompt(self.state, self.adapter)
        if self.owners and not captured and not self.state.warned_uncaptured:
            logger.warning(
                "tokensparse: this transformer call did not come through a pipeline Sparse Context was applied to "
                "(e.g. one made with from_pipe, or the bare transformer): its selection sees latents instead of "
                "the reference pixels, and no prompt; apply_sparse_context to that pipeline too")
            self.state.warned_uncaptured = True
        views = []
        for r, (pos, cells, (h, w)) in enumerate(zip(layout.positions, layout.cells, layout.grids)):
            feats = hs.new_zeros(1, h * w, hs.shape[-1])
            feats[:, cells.to(hs.device)] = hs[:1, pos.to(hs.device)]
            image = images[r] if images else None
            views.append(RefView(feats.view(1, h, w, -1).float(), image=image, index=r, prompts=prompts))
        with warnings.catch_warnings():
            if _warns_no_probe(self.state.cfg):  # apply already logged it: the scorer's UserWarning would repeat it
                warnings.filterwarnings("ignore", "selector 'attention' got no probe attention", UserWarning)
            gen = self.adapter.selection_generator(self.state.cfg, kwargs)  # None: the config's own seeded one
            keep = keep_mask(views, self.state.cfg, generator=gen)[0].to(hs.device)  # (N_refs,)
        self.state.selections += 1
        keep_seq = torch.ones(layout.n, dtype=torch.bool, device=hs.device)
        offset = 0
        for pos, cells, (h, w) in zip(layout.positions, layout.cells, layout.grids):
            keep_seq[pos.to(hs.device)] = keep[offset + cells.to(hs.device)]
            offset += h * w
        index = torch.nonzero(keep_seq).squeeze(1)  # sorted: target and references keep their order
        if self.state.cfg.proportional:
            sizes = sequence_sizes(views, keep, layout.n, layout.positions, layout.cells)
            self.state.sizes[key] = (sizes, image_bias(sizes, index))
        return index, layout


def _warn_first_prompt(state: _State, adapter: InContextAdapter) -> None:
    """Warn once where ``auto`` scores a shared selection by the first of a batch's different prompts."""
    prompts = state.prompts if state.prompts_tick == state.forwards else None
    if (state.cfg.selector == "auto" and not adapter.selects_per_sample and not state.warned_prompts and prompts
            and any(p != prompts[0] for p in prompts[1:])):
        logger.warning(
            "tokensparse: the prompts of this batch differ; selector 'auto' chose its scorer by the first prompt's "
            "task for every sample (the batch shares one selection): run the prompts in separate calls to select "
            "by each")
        state.warned_prompts = True


def _warns_no_probe(cfg: SparseContextConfig) -> bool:
    """Whether applying ``cfg`` logs that its selector needs a probe diffusers has none of (once, at apply)."""
    return cfg.selector != "auto" and needs_probe(cfg.selector)


# public API ---------------------------------------------------------------------------------------------
def apply_sparse_context_diffusers(target: Any, cfg: SparseContextConfig) -> Any:
    """Make ``target`` (a supported diffusers pipeline or transformer) keep a subset of reference tokens.

    ``cfg.keep`` of each reference's tokens are kept, chosen by ``cfg.selector`` once per generation.
    Calling it again replaces the earlier config; :func:`remove_sparse_context_diffusers` restores the
    exact original computation. ``keep=1.0`` is bit-identical to the unpatched model. A call without
    reference images (text-to-image) is a logged no-op. ``cfg.cache=True`` needs ``Flux2KleinKVPipeline``
    (whose K/V cache then holds only the kept references). ``cfg.proportional=True`` needs a FLUX.2 or FLUX.1
    Kontext / VisualCloze or OmniGen target without the K/V cache (``ValueError`` naming why otherwise; see
    :mod:`.diffusers_proportional`). Raises ``TypeError`` for unsupported targets. Returns ``target``.

    The hook lives on the transformer, so pipelines sharing it (``from_pipe``) share its config; each
    pipeline it was applied through captures its own reference pixels and prompt for the selection
    (applying through a second one keeps the first's capture).

    ``FluxPriorReduxPipeline`` (FLUX.1 Redux) has no transformer: its output's image tokens are thinned instead
    (:mod:`.diffusers_redux`).
    """
    if not isinstance(cfg, SparseContextConfig):
        raise TypeError(f"cfg must be a SparseContextConfig, got {type(cfg).__name__}")
    cfg = dataclasses.replace(cfg)  # a validated snapshot: later edits of the caller's object do not leak in
    if is_redux(target):  # a prior without a transformer: its image embeddings are thinned (:mod:`.diffusers_redux`)
        return apply_redux(target, cfg)
    pipe, transformer = _resolve(target)
    if cfg.proportional:  # ValueError where the log(size) bias cannot reach every attention exactly
        check_supported(transformer, _kv_pipeline(pipe), cfg.cache)
    if _warns_no_probe(cfg):
        logger.warning(
            "tokensparse: selector %r needs RefDiT attention probes; diffusers transformers have none, so it "
            "scores like 'foreground'", cfg.selector)
    adapter = adapter_class(pipe, transformer)
    if cfg.cache and adapter.cache_refusal:
        raise ValueError(adapter.cache_refusal)
    if cfg.cache and not _kv_pipeline(pipe):
        raise ValueError(
            "cache=True needs a pipeline with a reference K/V cache: use Flux2KleinKVPipeline "
            "(e.g. Flux2KleinKVPipeline.from_pipe(pipe)), or cache=False"
        )
    previous = _hook(transformer)
    owners = [pipe] if pipe is not None else []
    owners += [o for o in (previous.owners if previous else []) if o is not pipe and _shares(o, transformer)]
    removed = _remove(target)  # a pipeline target: its transformer's hook too
    hook = SparseContextHook(cfg, adapter(), owners)
    hook.attach(transformer)
    if not cfg.is_identity or removed:
        reset_if_compiled(transformer, "Sparse Context")
    on_generation_start(transformer, _CALLBACK, hook.state.new_generation)  # ts.begin_generation(transformer)
    for owner in owners:
        on_generation_start(owner, _CALLBACK, hook.state.new_generation)
        wrap_capture(owner, hook.state)
    return target


def _kv_pipeline(pipe: Any | None) -> bool:
    """Whether ``pipe`` is a pipeline with a reference K/V cache (:data:`.diffusers_models.KV_PIPELINES`)."""
    return pipe is not None and pipeline_name(pipe) in KV_PIPELINES


def _hook(transformer: Any) -> SparseContextHook | None:
    return transformer.__dict__.get(_HOOK)


def _shares(pipe: Any, transformer: Any) -> bool:
    return getattr(pipe, "transformer", None) is transformer


def remove_sparse_context_diffusers(target: Any) -> Any:
    """Undo :func:`apply_sparse_context_diffusers`; a target without Sparse Context is left as is."""
    if is_redux(target):
        return remove_redux(target)
    if _remove(target):
        reset_if_compiled(_resolve(target)[1], "Sparse Context")
    return target


def _remove(target: Any) -> bool:
    """Remove the hook, captures and callbacks; whether a non-identity hook was removed."""
    pipe, transformer = _resolve(target)
    hook = _hook(transformer)
    if hook is not None:
        hook.detach(transformer)
        for owner in hook.owners:
            if _shares(owner, transformer):  # not one that has since been given another transformer
                unwrap_capture(owner)
                remove_generation_callback(owner, _CALLBACK)
    remove_generation_callback(transformer, _CALLBACK)
    if pipe is not None:
        unwrap_capture(pipe)
        remove_generation_callback(pipe, _CALLBACK)
    return hook is not None and not hook.state.cfg.is_identity


def sparse_context_state(target: Any) -> _State | ReduxState | None:
    """The live selection state of a patched target (``selections`` counts computed selections)."""
    if is_redux(target):
        return redux_state(target)
    _, transformer = _resolve(target)
    hook = _hook(transformer)
    return hook.state if hook is not None else None

