"""Token merging on diffusers models: which blocks merge, where their target grid is, their positional tables.

- **UNets** (SD-style, any model built of ``BasicTransformerBlock``, also PixArt / DiT): ``attn1`` / ``attn2``
  / ``ff`` merge their input tokens in blocks whose token grid is at most ``cfg.max_downsample`` times
  coarser than the latent. **SD3 / SD3.5** (``JointTransformerBlock``) the same way: the joint ``attn``
  (image side; text tokens are its other stream), SD3.5's second self-attention ``attn2`` and ``ff``.
- **FLUX / FLUX.2 / LongCat-Image(-Edit) / Chroma / Ovis-Image / Bria 3.x / Bria FIBO(-Edit)**: the target grid
  (found from ``img_ids``, before or after the reference tokens) in every block: double-stream ``attn`` (with its RoPE
  rows) and ``ff``; single-stream ``attn`` (FLUX.2: attention and MLP fused) and the others' ``proj_mlp``. Bria FIBO
  (``BriaFiboTransformerBlock`` / ``BriaFiboSingleTransformerBlock``, ``BriaFiboPipeline``,
  ``BriaFiboEditPipeline``): FLUX.1's blocks, the target (T = 0) first, the Edit pipeline's references after it, the
  pipeline's key mask over ``[text, image]`` (``joint_attention_kwargs``) thinned with the merged tokens. See
  :mod:`.merging_flux`.
- **FLUX.3** (``Flux3Transformer2DModel``, its modular pipelines): the target grid (``img_ids``; the references come
  apart, as ``image_cond_hidden_states``) in the target's per-mode blocks (``mode_blocks["image"]``) and in the single
  blocks over ``[text, target, references]``: ``attn`` (with its RoPE rows) and ``ff``. See :mod:`.merging_flux3`.
- **Qwen-Image(-Edit)**: the target grid (the first entry of ``img_shapes``; reference tokens follow it)
  in every block's ``attn`` (with its image RoPE rows) and ``img_mlp``. **Qwen-Image-Layered** (``use_layer3d_rope``,
  ``QwenImageLayeredPipeline``): its target is every entry of ``img_shapes`` but the last (the input image, the one
  reference), the layers, each merged on its own grid (no token merges into another layer).
- **Qwen-Image 2.1** (``QwenImage21TransformerBlock``, ``QwenImage21Pipeline``): the target grid (the last entry of
  ``img_shapes``), last in the block-causal joint sequence ``[text, condition images, target]``, in every block's
  ``attn`` (its RoPE rows and key masks along; one table, so one matching, for the batch) and ``img_mlp``; the
  prefix, and the K/V of it the pipeline caches, never. See :mod:`.merging_qwen21`.
- **Z-Image** (``ZImageTransformer2DModel``, called as ``ZImagePipeline`` does: a flat list of latents): the
  image grid at the start of each sequence (found from the latents ``x``) in the ``attention`` (with its
  per-sample RoPE rows ``freqs_cis`` and the key padding mask) and ``feed_forward`` of the main ``layers`` and
  the image-only ``noise_refiner``; the caption (and SigLIP) refiners and the caption tokens are left alone.
  Z-Image Omni calls (reference images in the sequence) run unmerged, with a one-time warning.
- **Lumina 2** (``Lumina2TransformerBlock``, ``Lumina2Pipeline``): the image grid in the ``attn`` (its keys, RoPE
  rows and key padding mask along) and ``feed_forward`` of the joint ``layers`` and the image-only
  ``noise_refiner``; the caption and its ``context_refiner`` are left alone. See :mod:`.merging_lumina2`.
- **Fibo 2.0** (``BriaFibo2TransformerBlock``, ``BriaFibo2Pipeline``): the target grid in every block, in the
  ``noise_refiner`` (over ``[target, images to edit]``) and the main ``layers`` (the gist tokens before the target, or
  after the images to edit when a batch pads them): ``attention`` (RoPE rows, key mask along; a matching per
  sample), the injection blocks' ``cross_attention`` (``merge_cross``: its queries) and ``feed_forward``. See
  :mod:`.merging_fibo2`.
- **CogView4** (``CogView4TransformerBlock``, ``CogView4Pipeline``): every block's image stream, the whole of it, in
  ``attn1`` (with its RoPE rows; one table, so one matching, for the batch) and the image call of ``ff`` (the same
  module then runs the text stream, unmerged). See :mod:`.merging_cogview4`. **GLM-Image**
  (``GlmImageTransformerBlock``, ``GlmImagePipeline``): CogView4's blocks, merged the same way; the calls writing its
  condition images' K/V cache (``kv_caches`` in "write" mode) run unmerged. See :mod:`.merging_glm_image`.
- **Sana** (``SanaTransformerBlock``, ``SanaPipeline``, Sana Sprint): every block's image tokens in the linear
  self-attention ``attn1``, the cross-attention ``attn2`` (``merge_cross``: its queries) and the two pointwise
  convolutions of the mix-FFN (the depthwise 3x3 convolution between them runs on the whole grid). See
  :mod:`.merging_sana`.
- **HunyuanDiT** (``HunyuanDiTBlock``, ``HunyuanDiTPipeline``): every block's image tokens in ``attn1`` and (with
  ``merge_cross``) ``attn2``, each with its RoPE rows (one table, so one matching, for the batch), and ``ff``. See
  :mod:`.merging_hunyuan_dit`.
- **AuraFlow** (``AuraFlowJointTransformerBlock`` / ``AuraFlowSingleTransformerBlock``, ``AuraFlowPipeline``): the
  image tokens in every joint block's ``attn`` (image side) and ``ff``, and in every single block's ``attn`` and
  ``ff`` (the span after the registers and caption). See :mod:`.merging_auraflow`.
- **HiDream-I1** (``HiDreamImageTransformerBlock`` / ``HiDreamImageSingleTransformerBlock``,
  ``HiDreamImagePipeline``): the image grid at the start of every block's sequence in ``attn1`` (its RoPE rows and
  key mask along; per-sample tables: a matching per sample) and the image's mixture-of-experts ``ff_i``. See
  :mod:`.merging_hidream`.
- **HunyuanImage 2.1** (``HunyuanImageTransformerBlock`` / ``HunyuanImageSingleTransformerBlock``,
  ``HunyuanImagePipeline``): the image tokens in every double-stream block's ``attn`` (image side, RoPE rows, the
  key mask over ``[image, text]``) and ``ff``, and every single-stream block's ``proj_mlp`` and ``attn`` (one table,
  so one matching, for the batch). See :mod:`.merging_hunyuan_image`.
- **JoyImage Edit (Plus)** (``JoyImageTransformerBlock`` / ``JoyImageEditPlusTransformerBlock``,
  ``JoyImageEditPipeline``, ``JoyImageEditPlusPipeline``): the target grid, first in the image stream (its references
  follow), in every block's ``attn`` (image side, RoPE rows; Plus: the key mask over ``[image, text]``) and
  ``img_mlp``. See :mod:`.merging_joyimage`.
- **OmniGen** (``OmniGenBlock``, ``OmniGenPipeline``): the target grid, last in the decoder's sequence ``[text and
  input images, time token, target]`` (nothing before it attends to it), in every block's ``self_attn`` (its keys,
  RoPE rows and query x key mask along; one table, so one matching, for the batch) and ``mlp``. See
  :mod:`.merging_omnigen`.
- **CogView3-Plus** (``CogView3PlusTransformerBlock``, ``CogView3PlusPipeline``): every block's image stream in
  ``attn1`` (no positional table: the model adds its own before the blocks) and the image span, after the text, of
  ``ff``'s one call on ``[text, image]``; each sample its own matching. See :mod:`.merging_cogview3plus`.
- **ERNIE-Image** (``ErnieImageSharedAdaLNBlock``, ``ErnieImagePipeline``): the image grid, first in every block's
  ``[image, text]`` sequence, in ``self_attention`` (its RoPE rows and key mask along; per-sample tables: a matching
  per sample) and ``mlp`` (which takes the sequence first). See :mod:`.merging_ernie_image`.
- **PRX** (``PRXBlock``, ``PRXPipeline``): every block's image tokens in ``attention`` (their RoPE rows along;
  per-sample tables: a matching per sample; the text's keys and key mask pass) and the three linear layers of its
  inline MLP. See :mod:`.merging_prx`.
- **Lumina-Next** (``LuminaNextDiTBlock``, ``LuminaPipeline``): every block's image tokens in ``attn1`` (its keys,
  RoPE rows and key mask along; the pipeline's proportional scale kept), ``attn2`` (the caption's keys pass), the
  projection ``attn2.to_out[0]`` of their summed per-head outputs, and ``feed_forward``; one table ``(1, N, D/2)``
  expanded to the batch: a matching per sample. See :mod:`.merging_lumina_next`.
- **Krea 2** (``Krea2TransformerBlock``, ``Krea2Pipeline``): the image tokens, last in every block's ``[text, image]``
  sequence, in ``attn`` (their RoPE rows and key mask entries along; tables without a batch axis: one matching per
  batch) and ``ff``; the grid is read from the image rows of ``position_ids``. See :mod:`.merging_krea2`.
- **Ideogram 4** (``Ideogram4TransformerBlock``, ``Ideogram4Pipeline``): the image tokens, last in every block's
  packed ``[padding, text, image]`` sequence, in ``attention`` (their RoPE rows and their rows and columns of the
  segment mask along; per-sample tables: a matching per sample) and ``feed_forward``; the grid is read from the
  ``indicator`` and the image rows of ``position_ids``. The pipeline's ``unconditional_transformer`` is a second
  model: apply merging to it too to merge there. See :mod:`.merging_ideogram4`.

Text tokens and reference tokens are never merged (thinning references is Sparse Context's job).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import re
import sys
from typing import Any

import torch
from torch import Tensor, nn

from ..merging import Matching
from .calls import as_keywords, first_arg
from .diffusers_models import is_layered
from .merging_auraflow import wire_auraflow
from .merging_blocks import BlockMerger, Sublayer, leading_grid, merge_block
from .merging_cogview3plus import wire_cogview3plus
from .merging_cogview4 import wire_cogview4
from .merging_core import TokenMergingState, observe_calls
from .merging_ernie_image import wire_ernie_image
from .merging_fibo2 import wire_fibo2
from .merging_flux import (  # noqa: F401  (importable from here as before; the private ones for pickled models)
    _flux_grid,
    _flux_rope,
    _observe_flux,
    ids_grid,
    wire_flux,
)
from .merging_flux3 import target_blocks, wire_flux3
from .merging_glm_image import wire_glm_image
from .merging_hidream import wire_hidream
from .merging_hunyuan_dit import wire_hunyuan_dit
from .merging_hunyuan_image import wire_hunyuan_image
from .merging_ideogram4 import wire_ideogram4
from .merging_joyimage import wire_joyimage
from .merging_krea2 import wire_krea2
from .merging_lumina2 import image_blocks, wire_lumina2
from .merging_lumina_next import wire_lumina_next
from .merging_omnigen import wire_omnigen
from .merging_prx import wire_prx
from .merging_qwen21 import wire_qwen21
from .merging_sana import wire_sana
from .merging_spans import merge_span

logger = logging.getLogger(__name__)


# where diffusers keeps the block classes token merging knows: module -> {short name: class name}
_BLOCK_CLASSES: dict[str, dict[str, str]] = {
    "diffusers.models.attention": {"basic": "BasicTransformerBlock", "joint": "JointTransformerBlock"},
    "diffusers.models.transformers.transformer_flux": {"flux": "FluxTransformerBlock",
                                                       "flux_single": "FluxSingleTransformerBlock"},
    "diffusers.models.transformers.transformer_flux2": {"flux2": "Flux2TransformerBlock",
                                                        "flux2_single": "Flux2SingleTransformerBlock"},
    # LongCat-Image(-Edit), Bria 3.x: FLUX.1's blocks under other names (same sublayers, same RoPE layout)
    "diffusers.models.transformers.transformer_longcat_image": {"longcat": "LongCatImageTransformerBlock",
                                                                "longcat_single": "LongCatImageSingleTransformerBlock"},
    "diffusers.models.transformers.transformer_bria": {"bria": "BriaTransformerBlock",
                                                       "bria_single": "BriaSingleTransformerBlock"},
    # Bria FIBO (Edit): FLUX.1's blocks again (own attention class, same call and RoPE layout), the target first
    "diffusers.models.transformers.transformer_bria_fibo": {"bria_fibo": "BriaFiboTransformerBlock",
                                                            "bria_fibo_single": "BriaFiboSingleTransformerBlock"},
    # Fibo 2.0: Z-Image's blocks over [gist, target, images to edit] (the noise refiner's: no gist)
    "diffusers.models.transformers.transformer_bria_fibo2": {"fibo2": "BriaFibo2TransformerBlock"},
    # Chroma: FLUX.1's blocks (pruned modulation), a text padding mask squared into a query x key mask
    "diffusers.models.transformers.transformer_chroma": {"chroma": "ChromaTransformerBlock",
                                                         "chroma_single": "ChromaSingleTransformerBlock"},
    # Ovis-Image: FLUX.1's blocks with its own attention class (same call, same RoPE layout), SwiGLU MLPs
    "diffusers.models.transformers.transformer_ovis_image": {"ovis": "OvisImageTransformerBlock",
                                                             "ovis_single": "OvisImageSingleTransformerBlock"},
    # FLUX.3: per-mode blocks (each token mode alone) and single blocks over [text, target, references]
    "diffusers.models.transformers.transformer_flux3": {"flux3": "Flux3ModeTransformerBlock",
                                                        "flux3_single": "Flux3SingleTransformerBlock"},
    "diffusers.models.transformers.transformer_qwenimage": {"qwen": "QwenImageTransformerBlock"},
    # Qwen-Image 2.1: single-stream blocks over [text, condition images, target], block-causal, the target last
    "diffusers.models.transformers.transformer_qwenimage21": {"qwen21": "QwenImage21TransformerBlock"},
    "diffusers.models.transformers.transformer_z_image": {"zimage": "ZImageTransformerBlock"},
    "diffusers.models.transformers.transformer_lumina2": {"lumina2": "Lumina2TransformerBlock"},
    "diffusers.models.transformers.transformer_cogview4": {"cogview4": "CogView4TransformerBlock"},
    # GLM-Image: CogView4's blocks; its condition images' K/V-cache write calls run unmerged
    "diffusers.models.transformers.transformer_glm_image": {"glm_image": "GlmImageTransformerBlock"},
    "diffusers.models.transformers.sana_transformer": {"sana": "SanaTransformerBlock"},
    "diffusers.models.transformers.hunyuan_transformer_2d": {"hunyuan_dit": "HunyuanDiTBlock"},
    "diffusers.models.transformers.auraflow_transformer_2d": {"auraflow": "AuraFlowJointTransformerBlock",
                                                              "auraflow_single": "AuraFlowSingleTransformerBlock"},
    "diffusers.models.transformers.transformer_hidream_image": {"hidream": "HiDreamImageTransformerBlock",
                                                                "hidream_single": "HiDreamImageSingleTransformerBlock"},
    "diffusers.models.transformers.transformer_hunyuanimage": {
        "hunyuan_image": "HunyuanImageTransformerBlock", "hunyuan_image_single": "HunyuanImageSingleTransformerBlock"},
    # JoyImage Edit (Plus): double-stream blocks over [target, references] beside the text, the target first
    "diffusers.models.transformers.transformer_joyimage": {"joyimage": "JoyImageTransformerBlock"},
    "diffusers.models.transformers.transformer_joyimage_edit_plus": {
        "joyimage_plus": "JoyImageEditPlusTransformerBlock"},
    # OmniGen: one decoder over [text and input images, time token, target], causal but the images, the target last
    "diffusers.models.transformers.transformer_omnigen": {"omnigen": "OmniGenBlock"},
    # CogView3-Plus: image and text streams; its ff runs on [text, image]
    "diffusers.models.transformers.transformer_cogview3plus": {"cogview3plus": "CogView3PlusTransformerBlock"},
    # ERNIE-Image: single-stream blocks over [image, text], the sequence first
    "diffusers.models.transformers.transformer_ernie_image": {"ernie_image": "ErnieImageSharedAdaLNBlock"},
    # PRX: image-only blocks, the text projected into each attention's keys; an inline three-layer MLP
    "diffusers.models.transformers.transformer_prx": {"prx": "PRXBlock"},
    # Lumina-Next: image-only blocks; self- and cross-attention's per-head outputs summed, then one projection
    "diffusers.models.transformers.lumina_nextdit2d": {"lumina_next": "LuminaNextDiTBlock"},
    # Krea 2: single-stream blocks over [text, image], the image last (its text-fusion blocks see the text only)
    "diffusers.models.transformers.transformer_krea2": {"krea2": "Krea2TransformerBlock"},
    # Ideogram 4: single-stream blocks over a packed [padding, text, image], the image last
    "diffusers.models.transformers.transformer_ideogram4": {"ideogram4": "Ideogram4TransformerBlock"},
}


def diffusers_classes() -> dict[str, type]:
    """The diffusers block classes token merging knows, by short name (those this diffusers version has)."""
    if "diffusers" not in sys.modules:  # nothing can be a diffusers model before diffusers is imported
        return {}
    out: dict[str, type] = {}
    for module_name, names in _BLOCK_CLASSES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # diffusers not installed (only RefDiT is supported), or too old for this model
            continue
        out.update({short: getattr(module, cls) for short, cls in names.items() if hasattr(module, cls)})
    return out if "basic" in out else {}


KINDS = {"unet": ("basic", "joint"), "flux": ("flux", "flux2", "longcat", "chroma", "ovis", "bria", "bria_fibo"),
         "flux_single": ("flux_single", "flux2_single", "longcat_single", "chroma_single", "ovis_single",
                         "bria_single", "bria_fibo_single"),
         "flux3": ("flux3", "flux3_single"), "qwen": ("qwen",), "qwen21": ("qwen21",), "zimage": ("zimage",),
         "lumina2": ("lumina2",), "fibo2": ("fibo2",), "cogview4": ("cogview4",), "glm_image": ("glm_image",),
         "sana": ("sana",),
         "hunyuan_dit": ("hunyuan_dit",), "auraflow": ("auraflow", "auraflow_single"),
         "hidream": ("hidream", "hidream_single"), "hunyuan_image": ("hunyuan_image", "hunyuan_image_single"),
         "joyimage": ("joyimage", "joyimage_plus"), "omnigen": ("omnigen",), "cogview3plus": ("cogview3plus",),
         "ernie_image": ("ernie_image",), "prx": ("prx",), "lumina_next": ("lumina_next",),
         "krea2": ("krea2",), "ideogram4": ("ideogram4",)}
# Z-Image's blocks that see image tokens: the main layers and the noise refiner (image tokens only); its
# context_refiner / siglip_refiner blocks see caption / SigLIP tokens only
_ZIMAGE_IMAGE_BLOCKS = re.compile(r"(^|\.)(layers|noise_refiner)\.\d+$")


def find_blocks(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """The blocks of ``model`` that token merging knows and merges in, by kind (``unet``, ``flux``,
    ``flux_single``, ``flux3``, ``qwen``, ``qwen21``, ``zimage``, ``lumina2``, ``fibo2``, ``cogview4``,
    ``glm_image``, ``sana``, ``hunyuan_dit``, ``auraflow``, ``hidream``, ``hunyuan_image``, ``joyimage``,
    ``omnigen``, ``cogview3plus``, ``ernie_image``, ``prx``, ``lumina_next``, ``krea2``,
    ``ideogram4``); empty lists when it knows none."""
    classes = diffusers_classes()
    out: dict[str, list[tuple[str, nn.Module]]] = {}
    for kind, names in KINDS.items():
        types = tuple(classes[k] for k in names if k in classes)
        out[kind] = [(n, m) for n, m in model.named_modules() if types and isinstance(m, types)]
    out["zimage"] = [(n, m) for n, m in out["zimage"] if _ZIMAGE_IMAGE_BLOCKS.search(n)]
    out["lumina2"] = image_blocks(out["lumina2"])
    out["flux3"] = target_blocks(out["flux3"], classes.get("flux3_single"))
    return out


def wire(model: nn.Module, blocks: dict[str, list[tuple[str, nn.Module]]], state: TokenMergingState) -> None:
    """Hook the blocks :func:`find_blocks` found: those of the first kind of :data:`KINDS` it found (UNet blocks
    first; a model is one kind or another, FLUX's single-stream blocks wired with its double-stream ones)."""
    kind = next((k for k in KINDS if k != "flux_single" and blocks.get(k)), None)
    if kind == "flux":
        wire_flux(model, blocks["flux"], blocks.get("flux_single", []), state)
    elif kind is not None:
        wirings = {"unet": wire_unet, "flux3": wire_flux3, "qwen": wire_qwen, "zimage": wire_zimage,
                   "lumina2": wire_lumina2, "cogview4": wire_cogview4, "sana": wire_sana, "fibo2": wire_fibo2,
                   "glm_image": wire_glm_image,
                   "hunyuan_dit": wire_hunyuan_dit, "auraflow": wire_auraflow, "hidream": wire_hidream,
                   "hunyuan_image": wire_hunyuan_image, "qwen21": wire_qwen21, "joyimage": wire_joyimage,
                   "omnigen": wire_omnigen, "cogview3plus": wire_cogview3plus,
                   "ernie_image": wire_ernie_image, "prx": wire_prx, "lumina_next": wire_lumina_next,
                   "krea2": wire_krea2, "ideogram4": wire_ideogram4}
        wirings[kind](model, blocks[kind], state)


def latent_grid(state: TokenMergingState, n: int) -> tuple[int, int, int] | None:
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


# Hooks and grid functions are module-level functions bound with functools.partial, not closures, so that
# copy.deepcopy of a merged model copies them along with their state (closures would keep the original's).


def _observe_unet(state: TokenMergingState, patch: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    sample = first_arg(call, "sample", "hidden_states")
    if isinstance(sample, Tensor) and sample.dim() == 4:  # patchifying DiTs (PixArt, DiT, SD3): tokens per side
        # a patch conv drops a partial patch: floor (UNets: patch 1)
        state.latent_hw = (sample.shape[-2] // patch, sample.shape[-1] // patch)
    elif isinstance(sample, Tensor) and sample.dim() == 5 and not state.warned_video:  # (B, C, frames, H, W)
        state.warned_video = True
        logger.warning("tokensparse: token merging does not merge video (5-D) inputs; %s runs unmerged",
                       type(module).__name__)
    elif not (isinstance(sample, Tensor) and sample.dim() in (4, 5)) and not state.warned:
        state.warned = True  # instead of the generic "merged nothing" warning: the reason is known
        got = f"a {sample.dim()}-D tensor" if isinstance(sample, Tensor) else "no sample / hidden_states tensor"
        logger.warning("tokensparse: token merging merges the token grid of a (B, C, H, W) latent, and %s was "
                       "called with %s; it runs unmerged", type(module).__name__, got)
    grid = tuple(sample.shape[1:]) if isinstance(sample, Tensor) else None
    state.observe(first_arg(call, "timestep"), call, grid)


def _config_patch(module: nn.Module) -> int | None:
    config = getattr(module, "config", None)
    return config.get("patch_size") if isinstance(config, dict) else None


def patch_size(model: nn.Module) -> int:
    """Latent pixels per token side: the model's ``config.patch_size``; for a wrapper without one (e.g.
    ``SD3MultiControlNetModel``), that of the first model it holds that has one; UNets (none anywhere): 1."""
    if isinstance(getattr(model, "config", None), dict) and "patch_size" in model.config:
        return int(model.config["patch_size"] or 1)
    return next((int(p) for p in map(_config_patch, model.modules()) if p), 1)


def wire_unet(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook the self-attention (and, as configured, cross-attention and MLP) of every ``BasicTransformerBlock`` /
    SD3 joint block in ``blocks``; the token grid comes from the latent the model is called with."""
    cfg = state.cfg
    patch = patch_size(model)
    observe_calls(model, state, _observe_unet, patch)
    for name, blk in blocks:
        attn2 = getattr(blk, "attn2", None)
        if hasattr(blk, "attn1"):  # BasicTransformerBlock: self-attention attn1, cross-attention attn2
            self_attns, cross = [blk.attn1], [attn2] if attn2 is not None else []
        else:  # SD3's JointTransformerBlock: the joint attention (image side), SD3.5's second self-attention
            self_attns, cross = [blk.attn] + ([attn2] if attn2 is not None else []), []
        subs = [Sublayer(m, "hidden_states") for m in (self_attns if cfg.merge_attn else [])
                + (cross if cfg.merge_cross else [])]
        if cfg.merge_mlp and getattr(blk, "ff", None) is not None:
            subs.append(Sublayer(blk.ff, "hidden_states"))
        if subs:
            BlockMerger(state, name, subs, functools.partial(latent_grid, state))


def _qwen_rope(args: tuple, kwargs: dict, m: Matching, n_img: int, span: tuple[int, int]) -> tuple[tuple, dict]:
    """Qwen-Image's ``image_rotary_emb = (image rows, text rows)``: keep the kept target rows, all others."""
    rope = kwargs.get("image_rotary_emb")
    if rope is None:
        return args, kwargs
    img, txt = rope
    start, n = span
    img = torch.cat([img[:start], img[start:start + n][m.keep[0]], img[start + n:]], dim=0)
    return args, {**kwargs, "image_rotary_emb": (img, txt)}


def shapes_grid(shapes: Any) -> tuple[int, int] | None:
    """The target grid ``(h, w)`` of Qwen-Image's ``img_shapes``: per sample a list of ``(frames, h, w)``,
    the target first (reference images follow it in the sequence); one frame, else ``None``."""
    first = shapes[0] if isinstance(shapes, (list, tuple)) and shapes else None
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], (list, tuple)):
        first = first[0]
    if not isinstance(first, (list, tuple)) or len(first) != 3 or int(first[0]) != 1:
        return None
    return int(first[1]), int(first[2])


def layers_grid(shapes: Any) -> tuple[int, int, int] | None:
    """The target of Qwen-Image-Layered's ``img_shapes`` (per sample a list of ``(frames, h, w)``: the target layers,
    then the input image, the one reference) as ``(h, w, layers)``: every entry but the last, each one frame of one
    ``h x w`` grid; else ``None`` (no merging)."""
    entries = shapes[0] if isinstance(shapes, (list, tuple)) and shapes else None
    if not isinstance(entries, (list, tuple)) or len(entries) < 2:
        return None
    layers = {tuple(int(v) for v in e) if isinstance(e, (list, tuple)) and len(e) == 3 else None
              for e in entries[:-1]}
    if len(layers) != 1 or None in layers:
        return None
    frames, h, w = layers.pop()
    return (h, w, len(entries) - 1) if frames == 1 else None


def wire_qwen(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Qwen-Image(-Edit): each block's ``attn`` (image stream, RoPE rows) and ``img_mlp`` merge the target; on the
    layered transformer (:func:`layers_grid`) the target's layers, each on its own grid."""
    layered = is_layered(model)
    box: dict[str, Any] = {"grid": None, "layered": layered}
    observe_calls(model, state, _observe_qwen, box)
    grid = functools.partial(_layers_grid if layered else leading_grid, box)
    for name, blk in blocks:
        merge_block(state, name, Sublayer(blk.attn, "hidden_states", rope=_qwen_rope),
                    Sublayer(blk.img_mlp, "hidden_states"), grid, shared=True)


def _observe_qwen(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    shapes = first_arg(call, "img_shapes")
    box["grid"] = layers_grid(shapes) if box.get("layered") else shapes_grid(shapes)
    state.observe(first_arg(call, "timestep"), call, box["grid"])


def _layers_grid(box: dict, n: int) -> tuple[int, int, int, int] | None:
    """The layers ``box["grid"] = (h, w, layers)`` at the start of a sublayer's ``n`` tokens (Qwen-Image-Layered):
    ``(h, w, 0, layers)``, ``layers`` grids one after another."""
    g = box["grid"]
    return None if g is None or g[0] * g[1] * g[2] > n else (g[0], g[1], 0, g[2])


_leading_grid = leading_grid  # the name merged models pickled before 0.22.0 refer to


def wire_zimage(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Z-Image: ``attention`` and ``feed_forward`` of the main ``layers`` and ``noise_refiner`` merge the image grid.

    In text-to-image (basic) mode each sample's sequence is ``[image, image padding, caption, caption padding]``
    (the refiner's: the image and its padding), padded to the longest sample, whose padding the key mask
    ``attn_mask (B, L)`` hides; the image grid is its first ``h * w`` tokens. The RoPE table ``freqs_cis
    (B, L, D/2)`` has a batch dimension: each sample gets its own matching, and each kept token its own rotation.
    """
    box: dict[str, Any] = {"grid": None, "warned_omni": False}
    observe_calls(model, state, _observe_zimage, box)
    for name, blk in blocks:
        merge_block(state, name, Sublayer(blk.attention, "hidden_states", rope=_zimage_rope),
                    Sublayer(blk.feed_forward, "x"), functools.partial(leading_grid, box))


def _observe_zimage(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    x = call.get("x")
    box["grid"] = None
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], (list, tuple)):  # omni: [captions, images, SigLIP]
        if not box["warned_omni"]:
            box["warned_omni"] = state.warned = True  # instead of the generic "merged nothing" warning
            logger.warning("tokensparse: token merging does not merge Z-Image Omni calls (their sequence may hold "
                           "reference images beside the target, which it never merges); %s runs them unmerged",
                           type(module).__name__)
    elif isinstance(x, (list, tuple)) and x and all(isinstance(xi, Tensor) and xi.dim() == 4 for xi in x):
        shapes = {tuple(xi.shape[1:]) for xi in x}  # (C, F, H, W) each: one grid for the batch
        p, pf = call.get("patch_size", 2), call.get("f_patch_size", 1)
        if len(shapes) == 1:
            f, h, w = shapes.pop()
            box["grid"] = (h // p, w // p) if f // pf == 1 else None
    t = first_arg(call, "t")
    # Z-Image's t rises over a generation (1 - sigma)
    state.observe(1.0 - t if t is not None else None, call, box["grid"])


def _zimage_rope(args: tuple, kwargs: dict, m: Matching, n: int, span: tuple[int, int]) -> tuple[tuple, dict]:
    """Z-Image's ``freqs_cis (B, L, D/2)``: each kept image token keeps its own row; the others all stay."""
    freqs = kwargs.get("freqs_cis")
    if freqs is None:
        return args, kwargs
    return args, {**kwargs, "freqs_cis": merge_span(m, freqs.expand(m.batch_size, *freqs.shape[1:]), span,
                                                    mode="keep")}
