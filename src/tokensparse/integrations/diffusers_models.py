"""Where each supported diffusers model keeps its reference tokens, and how to subset them.

Model knowledge only; the hook wiring lives in :mod:`tokensparse.integrations.diffusers`.

Every supported pipeline (Z-Image Omni: see below) feeds its transformer one image sequence
``hidden_states (B, N, C)`` that concatenates the noisy target tokens and the tokens of every reference image,
and tells the transformer where each token sits:

- FLUX.2 (``Flux2Transformer2DModel``): ``img_ids (B, N, 4)`` = (T, H, W, L); the target has T = 0,
  reference ``i`` has T = 10 + 10 i. ``Flux2KleinKVPipeline`` puts the references *first* and passes
  ``num_ref_tokens`` at its K/V-extract step.
- FLUX.1 Kontext (``FluxTransformer2DModel``): ``img_ids (N, 3)`` = (T, H, W); the reference has T = 1.
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
  The adapter thins the write calls (see :class:`GlmImageAdapter`).
- Qwen-Image-Edit-Plus (``QwenImageTransformer2DModel``): no ids; ``img_shapes[b] = [(1, h0, w0),
  (1, h1, w1), ...]`` lists the target grid then each reference grid, in sequence order, and the
  transformer's ``pos_embed`` turns those shapes into RoPE frequencies (one row per image token).
  ``QwenImageEditInpaintPipeline`` has the same layout with one reference, the unmasked source image (its mask
  only blends the source back into the latents between steps).

A :class:`RefLayout` says where the reference tokens are; an adapter subsets ``hidden_states`` together
with whatever places the tokens (ids, or the RoPE rows for Qwen; for Z-Image the patchify output), so each kept
token keeps its position.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..images import to_tensor
from .diffusers_zimage import install as install_kept_patches


@dataclass
class RefLayout:
    """The reference tokens of one transformer call.

    n: length of the dense image sequence (target + references).
    positions: per reference, ``(n_r,)`` positions of its tokens in the sequence.
    cells: per reference, ``(n_r,)`` row-major index of each token's cell in its ``h x w`` grid.
    grids: per reference, its grid ``(h, w)``.
    """

    n: int
    positions: list[Tensor]
    cells: list[Tensor]
    grids: list[tuple[int, int]]

    @property
    def num_ref_tokens(self) -> int:
        return sum(len(p) for p in self.positions)


def _grid_layout(ids: Tensor, target: int = 0) -> RefLayout | None:
    """Layout from FLUX-style ids ``(N, D)`` whose first coordinate is ``target`` for the target, else a reference."""
    t = ids[:, 0]
    is_ref = t != target
    if not bool(is_ref.any()):
        return None
    positions, cells, grids = [], [], []
    for value in torch.unique_consecutive(t[is_ref]).tolist():
        pos = torch.nonzero(t == value).squeeze(1)
        rows = ids[pos, 1].long()
        cols = ids[pos, 2].long()
        rows, cols = rows - rows.min(), cols - cols.min()
        h, w = int(rows.max()) + 1, int(cols.max()) + 1
        if h * w != len(pos):
            raise ValueError(
                f"reference with id {value} has {len(pos)} tokens but spans a {h}x{w} grid; "
                "tokensparse expects dense references (is another token-dropping patch applied?)"
            )
        positions.append(pos)
        cells.append(rows * w + cols)
        grids.append((h, w))
    return RefLayout(ids.shape[0], positions, cells, grids)


class InContextAdapter:
    """What the hook asks of every adapter; the defaults fit transformers called with ``hidden_states (B, N, C)``,
    a falling ``timestep``, the references' pixels captured from the pipeline, and returning the token sequence
    (:meth:`scatter` puts the kept tokens' output back). Each adapter also has ``layout(kwargs) -> RefLayout | None``
    and ``subset(kwargs, index, layout, state)``."""

    cache_refusal: str | None = None  # why cache=True cannot run on this transformer, if it cannot

    def tokens(self, kwargs: dict[str, Any]) -> Tensor:
        """The call's image tokens ``(B, N, C)``, the sequence :meth:`layout`'s positions index (selection features)."""
        return kwargs["hidden_states"]

    def timestep(self, kwargs: dict[str, Any]) -> float | None:
        """The call's timestep, falling over a generation (a rise starts a new one), or ``None``."""
        t = kwargs.get("timestep")
        return None if t is None else float(t.flatten()[0])

    def is_kv_cached_call(self, kwargs: dict[str, Any]) -> bool:
        """Whether the references come from a K/V cache in this call (nothing to subset)."""
        return False

    def fresh_references(self, kwargs: dict[str, Any]) -> bool:
        """Whether this call's references get a selection of their own (not the generation's)."""
        return False

    def call_inputs(self, state: Any, kwargs: dict[str, Any]) -> tuple[list | None, list | None, bool] | None:
        """``(pixels per reference, prompts, captured)`` for this call's selection; ``None``: what the pipeline's
        capture holds (the default)."""
        return None

    def attach(self, transformer: torch.nn.Module, state: Any) -> list[Any]:
        """Companion hooks on ``transformer`` (objects with ``remove()``) that read ``state`` during a call."""
        return []

    def scatter(self, output: Any, index: Tensor, layout: RefLayout) -> Any:
        """The thinned call's output in the caller's shape: the kept tokens' rows put back at ``index`` of the dense
        ``layout.n``-token sequence (dropped rows zero); unchanged where the output is not over the kept tokens
        (a K/V extract step: the transformer already dropped the references)."""
        sample = output[0] if isinstance(output, tuple) else output.sample
        if sample.shape[1] != index.numel():
            return output
        dense = sample.new_zeros(sample.shape[0], layout.n, *sample.shape[2:])
        dense[:, index] = sample
        if isinstance(output, tuple):
            return (dense, *output[1:])
        output.sample = dense
        return output


class FluxIdsAdapter(InContextAdapter):
    """FLUX.2 and FLUX.1 Kontext: references are found and placed through ``img_ids``."""

    target_id = 0  # the first id coordinate of the target's tokens (every other value is a reference)

    def layout(self, kwargs: dict[str, Any]) -> RefLayout | None:
        ids = kwargs.get("img_ids")
        if ids is None:
            return None
        ids2 = ids[0] if ids.dim() == 3 else ids  # the transformer itself uses ids[0] for the whole batch
        layout = _grid_layout(ids2, self.target_id)
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
    companion hook on ``pos_embed`` (see :class:`QwenRopeHook` in the wiring module) computes the dense
    frequencies and keeps the rows of the kept tokens. ``img_shapes`` passed to the transformer is
    rewritten to ``[target, (1, 1, K)]`` so code that only counts tokens per image (``zero_cond_t``'s
    modulation index) sees the kept count.
    """

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
        positions, cells, grids, start = [], [], [], sizes[0]
        for (f, h, w), size in zip(per_sample[1:], sizes[1:]):
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
        out["img_shapes"] = [[s[0], (1, 1, kept_refs)] for s in shapes]
        state.rope = (shapes, index)  # read by the pos_embed hook during this forward
        return out


def _patches(image: Tensor, p: int, pf: int) -> Tensor:
    """A ``(C, F, H, W)`` latent as Z-Image patchifies it: ``(F/pf * H/p * W/p, pf * p * p * C)``, row-major."""
    c, f, h, w = image.shape
    grid = image.reshape(c, f // pf, pf, h // p, p, w // p, p).permute(1, 3, 5, 2, 4, 6, 0)
    return grid.reshape((f // pf) * (h // p) * (w // p), pf * p * p * c)


class ZImageOmniAdapter(InContextAdapter):
    """Z-Image Omni: ``x[b]`` lists sample ``b``'s images as whole ``(C, F, H, W)`` latents, the references first and
    the noisy target last, and the transformer patchifies and places them itself (positions ``(cap_end_j, h, w)``).

    The selection sees each image's patches (:func:`_patches`, padding excluded) as the image sequence
    ``[reference 1, ..., target]``; the subset is made on the transformer's own patchify output by
    :class:`~.diffusers_zimage.KeptPatches`, so every kept patch keeps its position id and noise-mask entry. The
    transformer returns the target's latents only, so there is nothing to scatter back. Its SigLIP tokens (a
    second, semantic view of each reference) stay whole. ``t`` rises over a generation: :meth:`timestep` is ``1 - t``.
    """

    @staticmethod
    def _images(kwargs: dict[str, Any]) -> list[list[Tensor]] | None:
        """Per sample, its images (``None`` entries left out); ``None`` outside omni mode (``x`` a list of tensors)."""
        x = kwargs.get("x")
        if not isinstance(x, (list, tuple)) or not x or not isinstance(x[0], (list, tuple)):
            return None
        images = [[img for img in sample if img is not None] for sample in x]
        shapes = [[tuple(img.shape) for img in sample] for sample in images]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ValueError("Sparse Context on ZImageTransformer2DModel needs every sample of a call to have the same "
                             f"images' sizes (the batch shares one selection), got {shapes}")
        return images

    def tokens(self, kwargs: dict[str, Any]) -> Tensor:
        images = self._images(kwargs)
        if images is None:
            return torch.zeros(len(kwargs.get("x") or [0]), 0, 1)
        p, pf = kwargs.get("patch_size", 2), kwargs.get("f_patch_size", 1)
        return torch.stack([torch.cat([_patches(img, p, pf) for img in sample]) for sample in images])

    def timestep(self, kwargs: dict[str, Any]) -> float | None:
        t = kwargs.get("t")
        return None if t is None else 1.0 - float(t.flatten()[0])

    def layout(self, kwargs: dict[str, Any]) -> RefLayout | None:
        images = self._images(kwargs)
        if images is None or len(images[0]) < 2:
            return None
        if kwargs.get("controlnet_block_samples") is not None:
            raise ValueError("Sparse Context cannot thin ZImageTransformer2DModel's controlnet_block_samples (they "
                             "are added over the dense sequence); call it without them")
        p, pf = kwargs.get("patch_size", 2), kwargs.get("f_patch_size", 1)
        grids = [((f // pf) * (h // p), w // p) for _, f, h, w in (img.shape for img in images[0])]
        device = images[0][0].device
        positions, cells, start = [], [], 0
        for h, w in grids[:-1]:
            positions.append(torch.arange(start, start + h * w, device=device))
            cells.append(torch.arange(h * w, device=device))
            start += h * w
        return RefLayout(start + prod(grids[-1]), positions, cells, grids[:-1])

    def subset(self, kwargs: dict[str, Any], index: Tensor, layout: RefLayout, state: Any) -> dict[str, Any]:
        state.omni = (index, layout.n)  # read by KeptPatches during this forward
        return dict(kwargs)

    def attach(self, transformer: torch.nn.Module, state: Any) -> list[Any]:
        return [install_kept_patches(transformer, state)]

    def scatter(self, output: Any, index: Tensor, layout: RefLayout) -> Any:
        return output  # the target's latents alone, as dense


class GlmImageAdapter(InContextAdapter):
    """GLM-Image: each condition image has its own "write" call, whose K/V the denoising calls read from the cache.

    ``hidden_states`` is a latent ``(B, C, H, W)`` the transformer patchifies itself, with RoPE over its own
    ``H/p x W/p`` grid. A write call is thinned by handing the transformer the kept patches side by side, a
    ``(B, C, p, K p)`` latent, with their dense RoPE rows as ``image_rotary_emb`` and their ``prior_token_id`` /
    ``prior_token_drop``; the cache then stores the kept tokens' K/V, and :meth:`scatter` puts the output back on
    the dense grid (dropped tokens zero).

    Each write is selected on its own (:meth:`fresh_references`), with that image's pixels and its prompt
    (:meth:`call_inputs`): every sample of a batch gets its own selection (the cache is per sample), but condition
    images cannot share a budget (``allocate``), and ``random`` keeps the same cells of same-sized images. The
    samples must keep equal token counts (the pipeline stacks their caches): counts that differ (adaptive budgets)
    are a ``ValueError`` at the first denoising call.
    """

    cache_refusal = ("cache=True is for Flux2KleinKVPipeline; GlmImagePipeline caches its condition images' K/V "
                     "itself (one write pass per image before the denoising loop, which Sparse Context thins): use "
                     "cache=False")

    def __init__(self) -> None:
        self.rope: Any = None  # the transformer's GlmImageRotaryPosEmbed (attach)
        self.patch = 1
        self.first_write = -2  # state.forwards at the first write of the current pipeline call

    def attach(self, transformer: torch.nn.Module, state: Any) -> list[Any]:
        """Remember the transformer's RoPE module and patch size (no companion hook)."""
        self.rope, self.patch = transformer.rope, int(transformer.config.patch_size)
        return []

    @staticmethod
    def _mode(kwargs: dict[str, Any]) -> str | None:
        caches = kwargs.get("kv_caches")
        return caches[0].mode if caches is not None and getattr(caches, "num_layers", 0) else None

    def tokens(self, kwargs: dict[str, Any]) -> Tensor:
        """The latent's patches ``(B, N, C p p)``, in the order of the transformer's ``image_projector``."""
        hs, p = kwargs["hidden_states"], self.patch
        b, c, h, w = hs.shape
        if h % p or w % p:
            raise ValueError(f"hidden_states {tuple(hs.shape)} is not a whole number of {p}x{p} patches")
        return hs.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // p ** 2, -1)

    def layout(self, kwargs: dict[str, Any]) -> RefLayout | None:
        if self._mode(kwargs) != "write":
            return None  # a call without a condition image (text-to-image, or no cache)
        _, _, h, w = kwargs["hidden_states"].shape
        grid = (h // self.patch, w // self.patch)
        n = grid[0] * grid[1]
        if kwargs["prior_token_id"].shape[-1] != n:
            raise ValueError(f"prior_token_id has {kwargs['prior_token_id'].shape[-1]} tokens but the latent {n}")
        cells = torch.arange(n, device=kwargs["hidden_states"].device)
        return RefLayout(n, [cells], [cells], [grid])

    def subset(self, kwargs: dict[str, Any], index: Tensor, layout: RefLayout, state: Any) -> dict[str, Any]:
        out, p = dict(kwargs), self.patch
        hs = kwargs["hidden_states"]
        kept = self.tokens(kwargs).index_select(1, index.to(hs.device))  # (B, K, C p p)
        b, k = kept.shape[:2]
        out["hidden_states"] = kept.reshape(b, k, hs.shape[1], p, p).permute(0, 2, 3, 1, 4).reshape(
            b, hs.shape[1], p, k * p)  # the kept patches side by side: the projector makes exactly these K tokens
        rope = kwargs.get("image_rotary_emb")
        if rope is None:
            rope = self.rope(hs)
        if not isinstance(rope, tuple) or any(r.shape[0] != layout.n for r in rope):
            raise ValueError(f"image_rotary_emb must be a (cos, sin) pair of {layout.n} rows")
        out["image_rotary_emb"] = tuple(r.index_select(0, index.to(r.device)) for r in rope)
        for name in ("prior_token_id", "prior_token_drop"):
            out[name] = kwargs[name].index_select(-1, index.to(kwargs[name].device))
        return out

    def scatter(self, output: Any, index: Tensor, layout: RefLayout) -> Any:
        """The thinned call's output ``(B, C, p, K p)`` on the dense ``(B, C, H, W)`` grid, dropped tokens zero."""
        sample = output[0] if isinstance(output, tuple) else output.sample
        (h, w), p = layout.grids[0], self.patch
        b, c = sample.shape[:2]
        kept = sample.reshape(b, c, p, -1, p).permute(0, 3, 1, 2, 4)  # (B, K, C, p, p)
        dense = kept.new_zeros(b, layout.n, c, p, p)
        dense[:, index.to(kept.device)] = kept
        dense = dense.reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h * p, w * p)
        if isinstance(output, tuple):
            return (dense, *output[1:])
        output.sample = dense
        return output

    def fresh_references(self, kwargs: dict[str, Any]) -> bool:
        """Every write call brings its own condition image: select anew."""
        return self._mode(kwargs) == "write"

    def call_inputs(self, state: Any, kwargs: dict[str, Any]) -> tuple[list | None, list | None, bool]:
        """``(pixels, prompts, captured)`` for this write: the pipeline captured every condition image (sample-major)
        and the prompts once, just before its first write; write ``j`` of the call is image ``j``, of sample
        ``kv_caches``' current one."""
        cache = kwargs["kv_caches"][0]
        if cache.current_sample_idx == 0 and not cache.k_caches:  # the first write into a fresh cache
            self.first_write = state.forwards
        j, sample = state.forwards - self.first_write, cache.current_sample_idx
        images = state.images[j:j + 1] if state.images and state.images_tick == self.first_write else None
        prompts = (state.prompts[sample:sample + 1]
                   if state.prompts and state.prompts_tick == self.first_write else None)
        return images or None, prompts or None, self.first_write in (state.images_tick, state.prompts_tick)

    def is_kv_cached_call(self, kwargs: dict[str, Any]) -> bool:
        """A denoising call: the condition K/V come from the cache ("read"), or not at all ("skip")."""
        mode = self._mode(kwargs)
        if mode == "read":
            lengths = {k.shape[1] for k in kwargs["kv_caches"][0].k_caches}
            if len(lengths) > 1:
                raise ValueError(
                    f"the samples' condition images left K/V caches of {sorted(lengths)} tokens; GLM-Image stacks "
                    "them per batch, so every sample must keep as many tokens (same-sized condition images, "
                    "and a fixed budget: not adaptive=True)")
        return mode in ("read", "skip")


# transformer class name -> adapter; pipeline class name -> (method receiving the preprocessed reference
# images, name of that argument, its position after self)
TRANSFORMERS: dict[str, type] = {
    "Flux2Transformer2DModel": FluxIdsAdapter,
    "FluxTransformer2DModel": FluxIdsAdapter,
    "QwenImageTransformer2DModel": QwenImageAdapter,
    "LongCatImageTransformer2DModel": LongCatIdsAdapter,
    "BriaFiboTransformer2DModel": BriaFiboAdapter,
    "ZImageTransformer2DModel": ZImageOmniAdapter,
    "GlmImageTransformer2DModel": GlmImageAdapter,
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
    "ZImageOmniPipeline": ("prepare_image_latents", "images", 0),  # a list of (1, 3, H, W) tensors
    # every prompt's condition images as PIL images, before its first transformer call (nested per prompt)
    "GlmImagePipeline": ("_validate_and_normalize_images", "image", 0),
    # inpainting: the source image is in-context too (Klein: a reference; Kontext: unless image_reference is given)
    "Flux2KleinInpaintPipeline": ("prepare_image_latents", "images", 0),
    "FluxKontextInpaintPipeline": ("prepare_latents", "image", 0),
    # Qwen-Image-Edit inpainting: the (unmasked) source image is the one reference, after the target
    "QwenImageEditInpaintPipeline": ("prepare_latents", "image", 0),
}
# an argument of the same method that, when given, holds the in-context image instead (name, position after self)
PREFERRED_IMAGE_ARG: dict[str, tuple[str, int]] = {"FluxKontextInpaintPipeline": ("image_reference", 10)}
# the image method's argument that, with an item of B_i images (B_i neither 1 nor it), makes them B_i references
STACKED_REFS_ARG: dict[str, tuple[str, int]] = {"Flux2KleinInpaintPipeline": ("batch_size", 1)}
# pipelines whose image method runs once per reference (each call's images follow the earlier ones of the call)
PER_REFERENCE_IMAGE_CALLS = ("BriaFiboEditPipeline",)
KV_PIPELINES = ("Flux2KleinKVPipeline",)
# inpainting: need a mask image
MASK_PIPELINES = ("Flux2KleinInpaintPipeline", "FluxKontextInpaintPipeline", "QwenImageEditInpaintPipeline")


def images_for_scorers(value: Any, batch_size: int | None = None) -> list[Tensor | None] | None:
    """Preprocessed pipeline images (``[-1, 1]``, ``(B, 3, H, W)`` or ``(B, 3, 1, H, W)``) or PIL images -> ``[0, 1]``
    pixels.

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
        pixels = isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] == 3
        for i in range(x.shape[0] if stacked else 1):
            out.append(((x[i:i + 1].detach().float() + 1) / 2).clamp(0, 1) if pixels else None)
    return out if any(x is not None for x in out) else None
