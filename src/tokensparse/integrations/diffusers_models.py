"""Where each supported diffusers model keeps its reference tokens, and how to subset them.

Model knowledge only; the hook wiring lives in :mod:`tokensparse.integrations.diffusers`.

Most supported pipelines feed their transformer one image sequence ``hidden_states (B, N, C)`` that concatenates
the noisy target tokens and the tokens of every reference image, and tell the transformer where each token sits;
others hand over latents the transformer patchifies and places itself:

- FLUX.2 (``Flux2Transformer2DModel``): ``img_ids (B, N, 4)`` = (T, H, W, L); the target has T = 0,
  reference ``i`` has T = 10 + 10 i. ``Flux2KleinKVPipeline`` puts the references *first* and passes
  ``num_ref_tokens`` at its K/V-extract step.
- FLUX.1 Kontext (``FluxTransformer2DModel``): ``img_ids (N, 3)`` = (T, H, W); the reference has T = 1.
- VisualCloze (``FluxTransformer2DModel``, a Fill model; ``VisualClozeGenerationPipeline``, ``VisualClozePipeline``):
  ``img_ids (N, 3)`` = (row, H, W), rows of its image grid numbered from 1, the query row (the target) last; every
  earlier row, an in-context example, is a reference (:mod:`.diffusers_visualcloze`, chosen by the pipeline:
  :data:`PIPELINE_ADAPTERS`; on the bare transformer, by the ids: a call with no T = 0 is VisualCloze's,
  :class:`FluxAdapter`).
- LongCat-Image-Edit (``LongCatImageTransformer2DModel``): FLUX-style ``img_ids (N, 3)`` = (modality, H, W)
  with the target's modality 1 and the reference's 2 (text ids have 0); H and W are offset by the text length.
- Bria FIBO Edit (``BriaFiboTransformer2DModel``): FLUX-style ``img_ids (N, 3)``; the target has T = 0,
  reference ``i`` T = i. With padded text the pipeline adds a boolean key mask ``(B, 1, 1, S_txt + N)`` in
  ``joint_attention_kwargs["attention_mask"]``, thinned here with the kept tokens.
- Z-Image Omni (``ZImageTransformer2DModel``): no image sequence is passed; ``x[b]`` lists sample ``b``'s
  latents ``(C, F, H, W)``, references first, target last, and the transformer patchifies them (2x2 patches, each
  image padded to 32 rows) into ``[caption, images, SigLIP]``, image ``j`` at positions ``(cap_end_j, h, w)``, with
  a per-token noise mask (clean references). The subset is made on its patchify output (:mod:`.diffusers_zimage`).
- GLM-Image (``GlmImageTransformer2DModel``): the exception. ``hidden_states`` is a latent ``(B, C, H, W)`` the
  transformer patchifies, with RoPE over its own grid; ``GlmImagePipeline`` calls it once per condition image
  (``kv_caches`` in mode "write": that image alone, its K/V stored), then the denoising calls read the cached K/V.
  The adapter thins the write calls (:mod:`.diffusers_glm_image`).
- Fibo 2.0 (``BriaFibo2Transformer2DModel``, ``BriaFibo2Pipeline``): takes the target ``(B, C, H, W)`` and the
  images to edit as ``context_latents`` and builds ``[target, image 1, ...]`` and its RoPE ids itself
  (:mod:`.diffusers_fibo2`: thinned at ``x_embedder`` and ``rope_embedder``; the output is the target).
- FLUX.3 (``Flux3Transformer2DModel``, modular pipelines only): the references come apart from the target, as
  ``image_cond_hidden_states`` with ``image_cond_ids`` (T, H, W, L), reference ``i`` at L = -1 - i, and produce no
  output (:mod:`.diffusers_flux3`).
- OmniGen (``OmniGenTransformer2DModel``): ``input_ids`` with placeholder runs that the transformer overwrites with
  each image's patch embeddings (``input_image_sizes``: where), then ``[text and images, time token, target]`` with a
  per-row ``(B, S, S)`` mask and 1D RoPE from row 0's ``position_ids``; the guidance rows place the images at
  different places, so each row is thinned on its own (:mod:`.diffusers_omnigen`).
- Qwen-Image-Edit-Plus (``QwenImageTransformer2DModel``): no ids; ``img_shapes[b] = [(1, h0, w0),
  (1, h1, w1), ...]`` lists the target grid then each reference grid, in sequence order, and the
  transformer's ``pos_embed`` turns those shapes into RoPE frequencies (one row per image token).
  ``QwenImageEditInpaintPipeline`` has the same layout with one reference, the unmasked source image (its mask
  only blends the source back into the latents between steps).
- Qwen-Image-Layered (the same transformer with ``use_layer3d_rope``, ``QwenImageLayeredPipeline``): ``img_shapes[b]``
  lists the target layers (the composite, then each generated layer) and, *last*, the input image, the one
  reference; its ``pos_embed`` (``QwenEmbedLayer3DRope``) gives that last entry the condition image's frequencies
  and derives the text rows' offset from every entry's grid and their count (:class:`QwenImageLayeredAdapter`).
- Qwen-Image 2.1 (``QwenImage21Transformer2DModel``, ``QwenImage21Pipeline``): ``hidden_states`` holds the condition
  images then the target, ``img_shapes`` their grids in that order; the transformer writes them into the prompt's
  image slots (``img_mask``) and derives RoPE rows, block-causal masks, modulation rows and its prefix K/V cache
  over that joint sequence (:mod:`.diffusers_qwen21`: thinned at every block and ``norm_out``).
- JoyImage Edit (``JoyImageEditTransformer3DModel``) and Edit Plus (``JoyImageEditPlusTransformer3DModel``): no
  ids; RoPE from shapes inside the forward (6D latents with the references first; Plus: patches and a
  ``shape_list``), so a pre-hook on every block swaps in the kept tokens' rows: :mod:`.diffusers_joyimage`.

A :class:`RefLayout` says where the reference tokens are; an adapter subsets ``hidden_states`` together
with whatever places the tokens (ids, or the RoPE rows for Qwen and JoyImage; for Z-Image, Fibo 2.0 and
Qwen-Image 2.1 what the transformer builds from its input), so each kept token keeps its position. The adapters
of FLUX, LongCat, Bria FIBO Edit and Qwen-Image-Edit are here; the others in their family's module.
"""

from __future__ import annotations

from math import prod
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..images import to_tensor
from .classes import known_name
from .diffusers_fibo2 import BriaFibo2Adapter
from .diffusers_flux3 import Flux3Adapter
from .diffusers_glm_image import GlmImageAdapter
from .diffusers_joyimage import JoyImageAdapter, JoyImageEditPlusAdapter
from .diffusers_layout import InContextAdapter, RefLayout, grid_layout
from .diffusers_omnigen import OmniGenAdapter
from .diffusers_qwen21 import QwenImage21Adapter
from .diffusers_visualcloze import VisualClozeAdapter
from .diffusers_zimage import ZImageOmniAdapter


class FluxIdsAdapter(InContextAdapter):
    """FLUX.2 and FLUX.1 Kontext: references are found and placed through ``img_ids``."""

    target_id = 0  # the first id coordinate of the target's tokens (every other value is a reference)

    def layout(self, kwargs: dict[str, Any]) -> RefLayout | None:
        ids = kwargs.get("img_ids")
        if ids is None:
            return None
        ids2 = ids[0] if ids.dim() == 3 else ids  # the transformer itself uses ids[0] for the whole batch
        layout = grid_layout(ids2, self.target_id)
        if layout is not None and kwargs["hidden_states"].shape[1] != layout.n:
            raise ValueError(
                f"hidden_states has {kwargs['hidden_states'].shape[1]} tokens but img_ids has {layout.n}"
            )
        return layout

    def subset(self, kwargs: dict[str, Any], index: Tensor, layout: RefLayout, state: Any) -> dict[str, Any]:
        out = dict(kwargs)
        out["hidden_states"] = kwargs["hidden_states"].index_select(1, index)  # (B, K, C)
        out["img_ids"] = kwargs["img_ids"].index_select(-2, index.to(kwargs["img_ids"].device))
        if kwargs.get("kv_cache_mode") == "extract":
            # Flux2KleinKVPipeline: references first; the transformer caches the first num_ref_tokens K/V
            out["num_ref_tokens"] = int(index.numel()) - (layout.n - layout.num_ref_tokens)
        return out

    def is_kv_cached_call(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("kv_cache_mode") == "cached"


class FluxAdapter(FluxIdsAdapter):
    """FLUX.1 (``FluxTransformer2DModel``): Kontext's layout (the target 0, the reference 1); a call whose ``img_ids``
    number no token 0 is VisualCloze's (rows from 1, the query row last: :class:`.VisualClozeAdapter`'s tokens,
    layout and captured pixels), so its bare transformer keeps the query row whole too."""

    def __init__(self) -> None:
        self.cloze = VisualClozeAdapter()

    def attach(self, transformer: torch.nn.Module, state: Any) -> list[Any]:
        return self.cloze.attach(transformer, state)

    @staticmethod
    def _is_cloze(kwargs: dict[str, Any]) -> bool:
        ids = kwargs.get("img_ids")
        return ids is not None and ids.numel() > 0 and not bool((ids[..., 0] == 0).any())

    def tokens(self, kwargs: dict[str, Any]) -> Tensor:
        return self.cloze.tokens(kwargs) if self._is_cloze(kwargs) else super().tokens(kwargs)

    def layout(self, kwargs: dict[str, Any]) -> RefLayout | None:
        return self.cloze.layout(kwargs) if self._is_cloze(kwargs) else super().layout(kwargs)

    def call_inputs(self, state: Any, kwargs: dict[str, Any]) -> tuple[list | None, list | None, bool] | None:
        """VisualCloze's: a VisualCloze pipeline's capture, kept when re-applied here, holds its grid's images."""
        return self.cloze.call_inputs(state, kwargs) if self._is_cloze(kwargs) else super().call_inputs(state, kwargs)


class LongCatIdsAdapter(FluxIdsAdapter):
    """LongCat-Image-Edit: FLUX-style ``img_ids`` whose first coordinate is a modality, 1 for the target."""

    target_id = 1


class BriaFiboAdapter(FluxIdsAdapter):
    """Bria FIBO Edit: FLUX-style ``img_ids`` (target 0, references 1, 2, ...) and, when the pipeline pads the
    text, a key mask over ``[text, image]`` tokens in ``joint_attention_kwargs`` that keeps the kept tokens' keys."""

    def subset(self, kwargs: dict[str, Any], index: Tensor, layout: RefLayout, state: Any) -> dict[str, Any]:
        out = super().subset(kwargs, index, layout, state)
        extra = kwargs.get("joint_attention_kwargs")
        mask = extra.get("attention_mask") if isinstance(extra, dict) else None
        if mask is None:
            return out
        n_txt = mask.shape[-1] - layout.n if isinstance(mask, Tensor) else -1
        if n_txt < 0 or any(d != 1 for d in mask.shape[1:-1]):
            raise ValueError(f"joint_attention_kwargs['attention_mask'] must be a key mask (B, 1, 1, S_txt + "
                             f"{layout.n}) over the text and image tokens, got {getattr(mask, 'shape', mask)}")
        keys = torch.cat([torch.arange(n_txt, device=mask.device), n_txt + index.to(mask.device)])
        out["joint_attention_kwargs"] = {**extra, "attention_mask": mask.index_select(-1, keys)}
        return out


class QwenImageAdapter(InContextAdapter):
    """Qwen-Image-Edit(-Plus): references are found through ``img_shapes`` and placed by RoPE rows.

    The transformer computes RoPE frequencies from ``img_shapes`` inside its ``pos_embed`` module, so a
    companion hook on ``pos_embed`` (:class:`QwenRopeHook`) computes the dense frequencies and keeps the rows of
    the kept tokens. ``img_shapes`` passed to the transformer is
    rewritten to ``[target, (1, 1, K)]`` so code that only counts tokens per image (``zero_cond_t``'s
    modulation index) sees the kept count.
    """

    def targets(self, per_sample: list) -> int:
        """How many leading entries of a sample's ``img_shapes`` are target images (the rest are references)."""
        return 1

    def layout(self, kwargs: dict[str, Any]) -> RefLayout | None:
        shapes = kwargs.get("img_shapes")
        if not shapes:
            return None
        per_sample = shapes[0]
        if not isinstance(per_sample, list) or len(per_sample) < 2:
            return None
        sizes = [prod(s) for s in per_sample]
        n = sum(sizes)
        if kwargs["hidden_states"].shape[1] != n:
            raise ValueError(
                f"hidden_states has {kwargs['hidden_states'].shape[1]} tokens but img_shapes says {n}"
            )
        device = kwargs["hidden_states"].device
        n_targets = self.targets(per_sample)
        positions, cells, grids, start = [], [], [], sum(sizes[:n_targets])
        for (f, h, w), size in zip(per_sample[n_targets:], sizes[n_targets:]):
            positions.append(torch.arange(start, start + size, device=device))
            cells.append(torch.arange(size, device=device))
            grids.append((f * h, w))
            start += size
        return RefLayout(n, positions, cells, grids)

    def subset(self, kwargs: dict[str, Any], index: Tensor, layout: RefLayout, state: Any) -> dict[str, Any]:
        out = dict(kwargs)
        out["hidden_states"] = kwargs["hidden_states"].index_select(1, index)
        shapes = kwargs["img_shapes"]
        kept_refs = int(index.numel()) - (layout.n - layout.num_ref_tokens)
        out["img_shapes"] = [[*s[:self.targets(s)], (1, 1, kept_refs)] for s in shapes]
        state.call = (shapes, index)  # read by the pos_embed hook during this forward
        return out

    def attach(self, transformer: torch.nn.Module, state: Any) -> list[Any]:
        rope = QwenRopeHook(state)
        pos_embed = transformer.pos_embed
        return [pos_embed.register_forward_pre_hook(rope.pre_forward, with_kwargs=True),
                pos_embed.register_forward_hook(rope.post_forward, with_kwargs=True, prepend=True)]


class QwenImageLayeredAdapter(QwenImageAdapter):
    """The layered Qwen-Image transformer (``use_layer3d_rope``, ``QwenImageLayeredPipeline``): ``img_shapes`` lists
    the target layers (the composite first, then each layer) and, *last*, the input image, the one reference.

    Its ``pos_embed`` (``QwenEmbedLayer3DRope``) gives the last entry the condition image's frequencies (layer index
    -1) and offsets the text rows by the largest grid and the layer count, all from the dense shapes, which
    :class:`QwenRopeHook` hands it; ``img_shapes`` is rewritten to ``[*layers, (1, 1, K)]`` for the token counting.
    """

    def targets(self, per_sample: list) -> int:
        return len(per_sample) - 1


def is_layered(transformer: Any) -> bool:
    """Whether ``transformer`` is the layered Qwen-Image one (``use_layer3d_rope``: its ``img_shapes`` end with the
    input image, after the target layers)."""
    return bool(getattr(getattr(transformer, "config", None), "use_layer3d_rope", False))


class QwenRopeHook:
    """Hooks on Qwen's ``pos_embed``: dense RoPE frequencies, then only the kept image rows."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.state.call is not None:
            shapes = self.state.call[0]
            if args:
                args = (shapes, *args[1:])
            else:
                kwargs["video_fhw"] = shapes
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.state.call is None:
            return output
        vid, txt = output
        return vid.index_select(0, self.state.call[1].to(vid.device)), txt


# transformer class name -> adapter; pipeline class name -> (method receiving the preprocessed reference
# images, name of that argument, its position after self). Every table here is keyed by diffusers class names and
# read through :func:`pipeline_name` / :func:`transformer_name`: a subclass is its nearest known base.
TRANSFORMERS: dict[str, type] = {
    "Flux2Transformer2DModel": FluxIdsAdapter,
    "FluxTransformer2DModel": FluxAdapter,
    "QwenImageTransformer2DModel": QwenImageAdapter,
    "LongCatImageTransformer2DModel": LongCatIdsAdapter,
    "BriaFiboTransformer2DModel": BriaFiboAdapter,
    "ZImageTransformer2DModel": ZImageOmniAdapter,
    "GlmImageTransformer2DModel": GlmImageAdapter,
    "BriaFibo2Transformer2DModel": BriaFibo2Adapter,
    "QwenImage21Transformer2DModel": QwenImage21Adapter,
    "JoyImageEditTransformer3DModel": JoyImageAdapter,
    "JoyImageEditPlusTransformer3DModel": JoyImageEditPlusAdapter,
    "OmniGenTransformer2DModel": OmniGenAdapter,
    "Flux3Transformer2DModel": Flux3Adapter,  # modular pipelines only (Flux3ModularPipeline): on the transformer
}
PIPELINES: dict[str, tuple[str, str, int]] = {
    "Flux2KleinPipeline": ("prepare_image_latents", "images", 0),
    "Flux2Pipeline": ("prepare_image_latents", "images", 0),
    "Flux2KleinKVPipeline": ("prepare_image_latents", "images", 0),
    "FluxKontextPipeline": ("prepare_latents", "image", 0),
    "QwenImageEditPlusPipeline": ("prepare_latents", "images", 0),
    "QwenImageEditPipeline": ("prepare_latents", "image", 0),
    "LongCatImageEditPipeline": ("prepare_latents", "image", 0),
    "BriaFiboEditPipeline": ("prepare_reference_latents", "image", 0),  # once per reference, a PIL image
    "BriaFibo2Pipeline": ("prepare_image_latents", "image", 0),  # a list: one (1, 3, h, w) tensor per image
    "QwenImage21Pipeline": ("prepare_latents", "images", 0),  # a list: one (1, 4, 1, h, w) RGBA tensor per image
    "ZImageOmniPipeline": ("prepare_image_latents", "images", 0),  # a list of (1, 3, H, W) tensors
    # every prompt's condition images as PIL images, before its first transformer call (nested per prompt)
    "GlmImagePipeline": ("_validate_and_normalize_images", "image", 0),
    # JoyImage: PIL images per sample (JoyImageEditPipeline: each sample's one reference; Plus: its list of them)
    "JoyImageEditPipeline": ("prepare_latents", "image", 9),
    "JoyImageEditPlusPipeline": ("prepare_latents", "reference_images", 7),
    # OmniGen: every row's images (conditional, then image-guidance rows) as (1, 3, H, W) tensors; the first row's
    # are the references
    "OmniGenPipeline": ("encode_input_images", "input_pixel_values", 0),
    # VisualCloze: per sample, its grid's rows of (1, 3, H, W) tensors (the first sample's are scored)
    "VisualClozeGenerationPipeline": ("prepare_latents", "input_image", 0),
    "VisualClozePipeline": ("prepare_latents", "input_image", 0),  # captured on its generation_pipe
    # inpainting: the source image is in-context too (Klein: a reference; Kontext: unless image_reference is given)
    "Flux2KleinInpaintPipeline": ("prepare_image_latents", "images", 0),
    "FluxKontextInpaintPipeline": ("prepare_latents", "image", 0),
    # Qwen-Image-Edit inpainting: the (unmasked) source image is the one reference, after the target
    "QwenImageEditInpaintPipeline": ("prepare_latents", "image", 0),
    # Qwen-Image-Layered: the input image, a (B, 4, 1, H, W) RGBA tensor, the one reference after the target layers
    "QwenImageLayeredPipeline": ("prepare_latents", "image", 0),
}
# an argument of the same method that, when given, holds the in-context image instead (name, position after self)
PREFERRED_IMAGE_ARG: dict[str, tuple[str, int]] = {"FluxKontextInpaintPipeline": ("image_reference", 10)}
# the image method's argument that, with an item of B_i images (B_i neither 1 nor it), makes them B_i references
STACKED_REFS_ARG: dict[str, tuple[str, int]] = {"Flux2KleinInpaintPipeline": ("batch_size", 1)}
# pipelines whose image method gets RGBA pixels (4 channels; the scorers read the RGB)
RGBA_PIPELINES = ("QwenImage21Pipeline", "QwenImageLayeredPipeline")
# pipelines whose image method runs once per reference (each call's images follow the earlier ones of the call)
PER_REFERENCE_IMAGE_CALLS = ("BriaFiboEditPipeline",)
# pipelines whose image argument lists the batch's samples: the first sample's references are scored
PER_SAMPLE_IMAGES = ("JoyImageEditPipeline", "JoyImageEditPlusPipeline", "VisualClozeGenerationPipeline")
# where a pipeline's prompt is captured when not encode_prompt's "prompt" (method, argument, position after self);
# JoyImage Plus encodes templated prompts, so its check_inputs gives the caller's; OmniGen has no encode_prompt
PROMPT_ARGS: dict[str, tuple[str, str, int]] = {"JoyImageEditPipeline": ("encode_prompt_multiple_images", "prompt", 0),
                                                "JoyImageEditPlusPipeline": ("check_inputs", "prompt", 0),
                                                "OmniGenPipeline": ("check_inputs", "prompt", 0),
                                                "VisualClozeGenerationPipeline": ("check_inputs", "task_prompt", 1)}
# pipelines whose transformer class other pipelines use with another layout: their own adapter
PIPELINE_ADAPTERS: dict[str, type] = {"VisualClozeGenerationPipeline": VisualClozeAdapter,
                                      "VisualClozePipeline": VisualClozeAdapter}
# pipelines that run an inner pipeline (attribute) on the same transformer: the captures go on that one
CAPTURE_THROUGH = {"VisualClozePipeline": "generation_pipe"}
KV_PIPELINES = ("Flux2KleinKVPipeline",)
# inpainting: need a mask image
MASK_PIPELINES = ("Flux2KleinInpaintPipeline", "FluxKontextInpaintPipeline", "QwenImageEditInpaintPipeline")


def pipeline_name(pipe: Any) -> str | None:
    """The supported pipeline class ``pipe`` is (the nearest of its class's MRO in :data:`PIPELINES`: a subclass of
    a supported pipeline is its base), or ``None``. The pipeline side tables here are read with this name."""
    return known_name(type(pipe), PIPELINES)


def transformer_name(transformer: Any) -> str | None:
    """The supported transformer class ``transformer`` is (the nearest of its class's MRO in
    :data:`TRANSFORMERS`), or ``None``."""
    return known_name(type(transformer), TRANSFORMERS)


def adapter_class(pipe: Any, transformer: Any) -> type:
    """The adapter of ``transformer`` in ``pipe``'s calls (``pipe`` ``None``: the bare transformer's); the layered
    Qwen-Image transformer's is :class:`QwenImageLayeredAdapter`, whichever pipeline calls it."""
    own = PIPELINE_ADAPTERS.get(pipeline_name(pipe)) if pipe is not None else None
    adapter = own or TRANSFORMERS[transformer_name(transformer)]
    return QwenImageLayeredAdapter if adapter is QwenImageAdapter and is_layered(transformer) else adapter


def images_for_scorers(value: Any, batch_size: int | None = None, rgba: bool = False) -> list[Tensor | None] | None:
    """Preprocessed pipeline images (``[-1, 1]``, ``(B, 3, H, W)`` or ``(B, 3, 1, H, W)``; with ``rgba``, 4-channel
    RGBA ones, read as their RGB) or PIL images -> ``[0, 1]`` pixels.

    Returns per reference one ``(1, 3, H, W)`` float tensor (the batch shares one selection), or ``None`` for
    one the pipeline passes as latents (Flux2KleinInpaintPipeline: the encoded source image before the
    references); ``None`` for the whole call when no reference is pixels. With ``batch_size`` (pipelines in
    :data:`STACKED_REFS_ARG`), an item of ``B`` images, ``B`` neither 1 nor ``batch_size``, is ``B`` references
    (Flux2KleinInpaintPipeline's ``image_reference`` list, stacked into one tensor); otherwise an item is one
    reference, its samples the batch's. Nested lists (GLM-Image: the condition images of each prompt) are read in
    order, prompt by prompt.
    """
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    items = [y for x in items for y in (x if isinstance(x, (list, tuple)) else [x])]  # GLM-Image: a list per prompt
    out: list[Tensor | None] = []
    for x in items:
        if isinstance(x, Image.Image):  # Bria FIBO hands its references over as PIL images
            out.append(to_tensor(x)[None].contiguous())
            continue
        if isinstance(x, Tensor) and x.dim() == 5:
            x = x[:, :, 0]
        stacked = batch_size is not None and isinstance(x, Tensor) and x.dim() == 4 and x.shape[0] not in (
            1, batch_size)
        if rgba and isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] == 4:
            x = x[:, :3]
        pixels = isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] == 3
        for i in range(x.shape[0] if stacked else 1):
            out.append(((x[i:i + 1].detach().float() + 1) / 2).clamp(0, 1) if pixels else None)
    return out if any(x is not None for x in out) else None
