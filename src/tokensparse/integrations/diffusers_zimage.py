"""Sparse Context inside ``ZImageTransformer2DModel`` (Z-Image Omni): thinning its own patchify output.

The Omni transformer takes, per sample, a list of whole ``(C, F, H, W)`` latents (references first, the noisy
target last) and patchifies them itself in ``patchify_and_embed_omni``, which returns, per sample, the image
patches of every image (each padded to a multiple of 32 rows), their position ids ``(cap_end_j, h, w)``, the
pad mask, the per-token noise mask (0: clean reference, 1: noisy target), the image sizes and the offsets of the
image part in the unified ``[caption, image, SigLIP]`` sequence. Everything the transformer later does per image
token (embedding, RoPE, padding to the batch, the noisy/clean modulation, the attention mask over the batch
padding, picking the target out of the output) is computed from that return value.

:class:`KeptPatches` stands in for that method on the instance while Sparse Context is applied: in a call the hook
thinned (``state.call`` set), it keeps only the kept reference patches' rows of all four per-token lists (every
target patch and every padding row stays), so each kept patch keeps its position id and noise-mask entry, and it
rewrites the sizes and offsets so that ``unpatchify`` reads the target from where it now sits. The per-image
padding rows stay as they were (they are the transformer's learned pad token, not image content).
"""

from __future__ import annotations

from math import prod
from typing import Any

import torch
from torch import Tensor

from .diffusers_layout import InContextAdapter, RefLayout

ATTR = "patchify_and_embed_omni"
_RETURNS = 14  # patchify_and_embed_omni's return tuple (diffusers 0.42)
_X, _SIZE, _POS, _PAD, _OFFSETS, _NOISE = 0, 3, 4, 7, 10, 11  # the image part of it


class KeptPatches:
    """``transformer.patchify_and_embed_omni`` (an instance attribute) that drops the dropped reference patches.

    Also the removal handle (``remove()``) of itself. It calls the class's method, then thins its result when
    ``state.call`` (``(kept image-token positions, dense image-token count)``, set by the adapter for the running
    call) is set; otherwise it returns it unchanged.
    """

    def __init__(self, transformer: torch.nn.Module, state: Any) -> None:
        self.transformer, self.state = transformer, state

    def __call__(self, all_x: list, all_cap_feats: list, all_siglip_feats: list, patch_size: int,
                 f_patch_size: int, images_noise_mask: list) -> tuple:
        out = type(self.transformer).patchify_and_embed_omni(
            self.transformer, all_x, all_cap_feats, all_siglip_feats, patch_size, f_patch_size, images_noise_mask)
        kept = self.state.call
        if kept is None:
            return out
        target = all_x[0][-1].shape  # (C, F, H, W): the last image is the one the transformer returns
        n_target = (target[1] // f_patch_size) * (target[2] // patch_size) * (target[3] // patch_size)
        return thin_patches(out, kept[0], kept[1], n_target)

    def remove(self) -> None:
        if self.transformer.__dict__.get(ATTR) is self:
            del self.transformer.__dict__[ATTR]


def install(transformer: torch.nn.Module, state: Any) -> KeptPatches:
    """Put a :class:`KeptPatches` on ``transformer`` (replacing an earlier one); returns it (``remove()`` undoes it)."""
    if not callable(getattr(type(transformer), ATTR, None)):
        raise TypeError(f"{type(transformer).__name__} has no {ATTR} (a diffusers version tokensparse does not know)")
    patch = KeptPatches(transformer, state)
    transformer.__dict__[ATTR] = patch
    return patch


def thin_patches(out: tuple, index: Tensor, n: int, n_target: int) -> tuple:
    """``patchify_and_embed_omni``'s return value with only the image tokens at ``index`` (positions among the ``n``
    real, unpadded image tokens of a sample, images in order; the last ``n_target`` are the target's, all kept) and
    every padding row; the sizes and offsets then describe the target alone, at its new place."""
    if not isinstance(out, tuple) or len(out) != _RETURNS:
        raise RuntimeError(f"ZImageTransformer2DModel.{ATTR} returned {type(out).__name__} of "
                           f"{len(out) if isinstance(out, tuple) else '?'} items, not the {_RETURNS} tokensparse knows")
    out = tuple(list(item) if isinstance(item, list) else item for item in out)  # per-sample lists, copied
    x, size, pos, pad, offsets, noise = (out[k] for k in (_X, _SIZE, _POS, _PAD, _OFFSETS, _NOISE))
    for i in range(len(x)):
        real = torch.nonzero(~pad[i]).squeeze(1)  # rows of the image tokens (the rest pads each image to 32)
        if real.numel() != n:
            raise ValueError(f"sample {i} has {real.numel()} image tokens, but Sparse Context's selection is over {n} "
                             "(every sample of a call must have the same images' sizes)")
        keep = pad[i].clone()
        keep[real[index.to(real.device)]] = True
        rows = torch.nonzero(keep).squeeze(1)
        tail = pad[i].numel() - int(real[n - n_target])  # the target's rows and its padding: the end of the images
        x[i], pos[i], pad[i] = x[i][rows], pos[i][rows], pad[i][rows]
        noise[i] = [noise[i][r] for r in rows.tolist()]
        size[i] = [size[i][-1]]  # unpatchify walks the sizes from the offset: the target alone
        start = offsets[i][0]
        offsets[i] = (start + rows.numel() - tail, start + rows.numel())
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
        state.call = (index, layout.n)  # read by KeptPatches during this forward
        return dict(kwargs)

    def attach(self, transformer: torch.nn.Module, state: Any) -> list[Any]:
        return [install(transformer, state)]

    def scatter(self, output: Any, index: Tensor, layout: RefLayout) -> Any:
        return output  # the target's latents alone, as dense
