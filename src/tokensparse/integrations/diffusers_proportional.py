"""Proportional Sparse Context (``SparseContextConfig(proportional=True)``) on diffusers transformers.

Each dropped reference token is assigned to the kept token of its reference nearest to it (L2 over the
selection's features, :class:`~tokensparse.selection.RefView` ``features``: the packed VAE latent tokens), and a
kept token standing for ``s`` tokens gets ``log(s)`` added to its attention logits in every attention of every
block: exactly what ``s`` identical copies of it at its position would receive (``exp(l + log s) = s exp(l)``).

Where it is exact, and where it is refused:

- FLUX.2 (``Flux2Transformer2DModel``) and FLUX.1 Kontext / VisualCloze (``FluxTransformer2DModel``): it hands
  ``joint_attention_kwargs`` to every block's attention, whose processor passes ``attention_mask`` on to the
  attention as an additive logit mask. Both stream layouts put the text first: double-stream attention
  concatenates ``[text, image]`` queries / keys, single-stream blocks ``[text, image]`` tokens; the image part
  is ``hidden_states`` in its own order (target then references; FLUX.2 inpainting target, source, references).
  The bias is a float mask ``(1, 1, 1, S_txt + K)``: 0 for text, target and unit-size tokens, ``log(size)`` for
  kept reference tokens, over the *kept* image sequence. The batch shares it (as it shares the selection).
- ``Flux2KleinKVPipeline`` (the reference K/V cache): refused. Its processors (``Flux2KVAttnProcessor``,
  ``Flux2KVParallelSelfAttnProcessor``) drop ``attention_mask`` in both K/V modes (they call
  ``_flux2_kv_causal_attention`` without one): at the extract step neither the target's attention over the
  references nor the references' self-attention could see the bias, and at cached steps the target's queries
  attend to the cached reference keys unbiased. A per-key logit bias cannot be folded into the cached keys or
  values either (only repeating each kept K/V ``size`` times is exact, which is the dense cache).
- LongCat-Image-Edit: refused. ``LongCatImageTransformer2DModel.forward`` takes no ``joint_attention_kwargs``, so
  nothing can hand its attention processors an ``attention_mask``.
- Bria FIBO Edit: refused. Its pipeline passes its own boolean text-padding ``attention_mask``; the bias would
  have to be merged into it (not implemented).
- Z-Image Omni: refused. ``ZImageTransformer2DModel.forward`` reads only the LoRA ``scale`` from
  ``joint_attention_kwargs``; its attention gets the boolean batch-padding mask the transformer builds itself.
- GLM-Image: refused. ``GlmImageAttnProcessor`` takes only a ``(batch, text length)`` padding mask and turns it into
  a boolean one, and the denoising calls attend to the condition images through the K/V cache, which no mask
  covers.
- JoyImage Edit / Edit Plus: refused. Their forwards take no attention kwargs; ``JoyImageAttnProcessor`` calls the
  attention with ``attn_mask=None`` and the Plus transformer passes only the boolean padding mask it builds from
  ``encoder_hidden_states_mask``.
- Fibo 2.0 (``BriaFibo2Transformer2DModel``): refused. Its ``forward`` takes no attention kwargs; its attention
  only gets the boolean gist-padding mask the transformer builds itself.
- Qwen-Image 2.1 (``QwenImage21Transformer2DModel``): refused. Its processors get only the block-causal mask
  (a flex ``BlockMask`` or per-segment masks) and the text-padding mask the transformer builds; its
  ``attention_kwargs`` only carry the LoRA scale.
- OmniGen (``OmniGenTransformer2DModel``): its attention adds the float mask the transformer makes of the
  pipeline's per-row 0/1 mask, and takes a 4D additive one as it is; the adapter hands it that additive mask with
  the bias on each row's columns of its kept image tokens (``diffusers_omnigen.OmniGenAdapter.with_bias``).
- Qwen-Image-Edit(-Plus): refused. ``QwenDoubleStreamAttnProcessor2_0`` raises on an external
  ``attention_mask`` and builds its own boolean mask from ``encoder_hidden_states_mask`` (which the transformer
  turns to bool), so a float bias has no way in.

Attention backends: the mask reaches ``dispatch_attention_fn``. The SDPA backends (``native``, ``_native_math``,
``_native_efficient``, ``_native_cudnn``), ``flex`` (as a ``score_mod``) and ``xformers`` add it to the logits;
the flash / sage / aiter / XLA / ``_native_flash`` backends take no mask (diffusers raises), the varlen ones
only a boolean padding mask (diffusers raises), and ``_native_npu`` would turn it into a boolean mask (silently
wrong). A call through any backend but the first group is refused here, naming it. On GPU a mask also makes
PyTorch's SDPA leave the FlashAttention kernel for the memory-efficient (or cuDNN) one, which can be slower.

The mask has the call's dtype (SDPA takes no other): exact in float32; in bfloat16 ``log(size)`` rounds, so a
kept token's attention mass is off by up to ~1.6 %.

A caller's own ``joint_attention_kwargs["attention_mask"]`` is refused rather than combined (it would be over
the dense sequence, which the hook thins).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from ..context import reference_sizes
from ..selection import RefView
from .classes import known_name

logger = logging.getLogger(__name__)

# processors take an additive mask
BIAS_TRANSFORMERS = ("Flux2Transformer2DModel", "FluxTransformer2DModel", "OmniGenTransformer2DModel")
# the other supported transformers: why no log(size) bias reaches their attention
NO_BIAS: dict[str, str] = {
    "QwenImageTransformer2DModel": " (its QwenDoubleStreamAttnProcessor2_0 refuses an external "
        "attention_mask and builds a boolean one from encoder_hidden_states_mask, so a float log(size) bias "
        "cannot reach its attention)",
    "LongCatImageTransformer2DModel": " (its forward takes no joint_attention_kwargs, so no "
        "attention_mask can reach its attention)",
    "BriaFiboTransformer2DModel": " (its pipeline passes its own text-padding attention_mask, which the "
        "log(size) bias would have to be merged into; not implemented)",
    "BriaFibo2Transformer2DModel": " (its forward takes no attention kwargs: the only mask its attention "
        "gets is the gist-padding mask it builds itself, so no log(size) bias can reach it)",
    "QwenImage21Transformer2DModel": " (its attention processors get only the block-causal and text-padding "
        "masks the transformer builds itself; its attention_kwargs carry the LoRA scale alone, so no "
        "log(size) bias can reach them)",
    "ZImageTransformer2DModel": " (its forward reads only the LoRA scale from joint_attention_kwargs and "
        "hands its attention only the boolean batch-padding mask it builds, so no float log(size) bias can "
        "reach it)",
    "GlmImageTransformer2DModel": " (its GlmImageAttnProcessor takes only a (batch, text length) padding "
        "mask, made boolean, and the denoising calls read the condition images' keys from its K/V cache, "
        "which no mask covers)",
    "JoyImageEditTransformer3DModel": " (its forward takes no attention kwargs and JoyImageAttnProcessor "
        "calls the attention with attn_mask=None, so no log(size) bias can reach it)",
    "JoyImageEditPlusTransformer3DModel": " (its forward takes no attention kwargs; its attention gets only "
        "the boolean padding mask it builds from encoder_hidden_states_mask)",
    "Flux3Transformer2DModel": " (its attention_kwargs carry the LoRA scale alone and its blocks call the attention "
        "without a mask, so no log(size) bias can reach it)",
}
# dispatch_attention_fn backends that add a float attn_mask to the logits
MASK_BACKENDS = frozenset({"native", "_native_math", "_native_efficient", "_native_cudnn", "flex", "xformers"})
# attention processors known to pass attention_mask on to the attention (the KV ones outside their K/V modes)
MASK_PROCESSORS = frozenset({"Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor", "Flux2KVAttnProcessor",
                             "Flux2KVParallelSelfAttnProcessor", "FluxAttnProcessor", "FluxIPAdapterAttnProcessor",
                             "OmniGenAttnProcessor2_0", "RowRope"})  # RowRope: OmniGen's, run row by row

KV_REFUSAL = ("proportional=True cannot be combined with FLUX.2's reference K/V cache (Flux2KleinKVPipeline, "
              "kv_cache_mode 'extract' / 'cached'): diffusers' Flux2KVAttnProcessor and "
              "Flux2KVParallelSelfAttnProcessor drop attention_mask in those modes, so the log(size) bias cannot "
              "reach the attention over the references (and the cache would have to repeat each kept K/V size "
              "times, i.e. be dense); use Flux2KleinPipeline (Flux2KleinPipeline.from_pipe(pipe)) or "
              "proportional=False")


def check_supported(transformer: Any, kv_pipeline: bool, cache: bool) -> None:
    """Raise ``ValueError`` naming why ``proportional=True`` cannot be exact for this target (a subclass of a
    transformer is judged as its base, :func:`.classes.known_name`)."""
    name = type(transformer).__name__
    kind = known_name(type(transformer), (*BIAS_TRANSFORMERS, *NO_BIAS))
    if kind not in BIAS_TRANSFORMERS:
        raise ValueError(f"proportional=True is implemented for RefDiT, FLUX.2 (Flux2Transformer2DModel), FLUX.1 "
                         f"Kontext / VisualCloze (FluxTransformer2DModel) and OmniGen pipelines, not {name}"
                         f"{NO_BIAS.get(kind, '')}; use proportional=False")
    if kv_pipeline or cache:
        raise ValueError(KV_REFUSAL)


def sequence_sizes(views: list[RefView], keep: Tensor, n: int, positions: list[Tensor], cells: list[Tensor]
                   ) -> Tensor:
    """How many dense tokens each token of the image sequence stands for, ``(n,)`` float32.

    ``keep (N_refs,)`` is the selection over the references' cells (concatenated in reference order, row-major
    per reference, as ``views``); reference ``r``'s tokens sit at ``positions[r]`` of the sequence, covering cells
    ``cells[r]``. Target tokens are 1, kept reference tokens ``1 + `` the number of dropped tokens nearest to them
    (:func:`~tokensparse.context.reference_sizes` over ``views[r].features``), dropped ones 0: each reference's
    sizes sum to its token count (to 0 for a reference that keeps nothing).
    """
    dense = reference_sizes(views, keep[None])[0]  # (N_refs,) in cell order
    out = torch.ones(n, dtype=torch.float32, device=keep.device)
    offset = 0
    for view, pos, cell in zip(views, positions, cells):
        out[pos.to(keep.device)] = dense[offset + cell.to(keep.device)]
        offset += view.grid[0] * view.grid[1]
    return out


def image_bias(sizes: Tensor, index: Tensor) -> Tensor | None:
    """``log(size)`` of the kept image tokens ``(K,)``, or ``None`` when every one stands for itself alone (no
    mask: the call stays the plain sparse one, bit for bit)."""
    kept = sizes[index.to(sizes.device)]
    return None if bool((kept == 1).all()) else kept.log()


def check_call(kwargs: dict[str, Any]) -> None:
    """Refuse a K/V-cache call (``kv_cache_mode`` set): the bias cannot reach its attention."""
    if kwargs.get("kv_cache_mode") is not None:
        raise ValueError(KV_REFUSAL)


def with_bias(call: dict[str, Any], bias: Tensor) -> dict[str, Any]:
    """``call`` (the thinned transformer call) with the ``log(size)`` mask in a copy of its
    ``joint_attention_kwargs``; ``ValueError`` for a caller's own ``attention_mask``."""
    joint = dict(call.get("joint_attention_kwargs") or {})
    if joint.get("attention_mask") is not None:
        raise ValueError("proportional=True passes its log(size) bias as joint_attention_kwargs['attention_mask'], "
                         "and this call already has one (over the dense sequence, which Sparse Context thins): "
                         "drop it or use proportional=False")
    hs, txt = call["hidden_states"], call["encoder_hidden_states"]
    if bias.numel() != hs.shape[1]:
        raise ValueError(f"the proportional bias covers {bias.numel()} tokens but the call has {hs.shape[1]}")
    mask = torch.cat([bias.new_zeros(txt.shape[1]), bias.to(hs.device)]).to(hs.dtype)
    joint["attention_mask"] = mask[None, None, None, :]  # (1, 1, 1, S_txt + K): text first, as both streams
    return {**call, "joint_attention_kwargs": joint}


def check_attention(module: torch.nn.Module, state: Any) -> None:
    """Before a selection's bias is used (once per generation and layout, not per step): ``ValueError`` for an
    attention backend of ``module`` that does not add a float mask to the logits; a one-time warning
    (``state.warned_processor``) naming attention processors not known to pass ``attention_mask`` on."""
    unknown = _check_backends(module)
    if unknown and not state.warned_processor:
        state.warned_processor = True
        logger.warning("tokensparse: proportional=True passes its bias as attention_mask; attention processor(s) %s "
                       "are not ones known to pass it on to the attention", ", ".join(unknown))


def _check_backends(module: torch.nn.Module) -> list[str]:
    """Raise ``ValueError`` for an attention backend that does not add a float mask; the names of the attention
    processors not known to pass ``attention_mask`` on."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        active = _AttentionBackendRegistry.get_active_backend()[0]
    except (ImportError, AttributeError):  # another diffusers: its default (native) is assumed
        active = "native"
    unknown: set[str] = set()
    for m in module.modules():
        processor = getattr(m, "processor", None)
        if processor is None:
            continue
        backend = getattr(processor, "_attention_backend", None) or active
        backend = str(getattr(backend, "value", backend))
        if backend not in MASK_BACKENDS:
            raise ValueError(f"proportional=True adds its log(size) bias as an attention_mask, and attention backend "
                             f"{backend!r} ({type(m).__name__}) does not add a float mask to the logits; use one of "
                             f"{sorted(MASK_BACKENDS)} (e.g. transformer.reset_attention_backend()) or "
                             "proportional=False")
        if known_name(type(processor), MASK_PROCESSORS) is None:
            unknown.add(type(processor).__name__)
    return sorted(unknown)
