"""``tokensparse show selection``: draw which reference tokens a selector keeps.

    save_selection_map([Path("a.png"), Path("b.png")], "auto", 0.25, Path("map.png"), prompt="compose ...")

Each reference is resized to the model's image size and cut into its token grid; kept tokens are drawn
bright with an outline, dropped tokens dimmed. The references of one call share the budget exactly as
in generation (allocation across references, adaptive budgets). ``selector="attention"`` (and ``auto``
where it probes) needs a model: a shipped name or a checkpoint path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from . import checks
from .context import SparseContextConfig, keep_mask
from .images import load_rgb, save_png, to_tensor
from .selection import needs_probe


def _load_refs(refs: list[Path], size: int) -> list[Tensor]:
    out = []
    for path in refs:
        img = to_tensor(load_rgb(path))[None]  # (1, 3, H, W) in [0, 1]
        out.append(F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                   .clamp(0, 1))
    return out


def selection_masks(images: list[Tensor], cfg: SparseContextConfig, patch: int, prompt: str | None = None,
                    model=None) -> list[Tensor]:
    """Keep masks ``(h, w)`` per reference for images ``(1, 3, S, S)`` in [0, 1] (a model for probes; a Sparse
    Context applied to it stays applied: the probe reads the dense reference tokens past its hook)."""
    from .api import _probe_views, reference_views
    from .vocab import tokenize

    views = reference_views([im * 2 - 1 for im in images], patch, [prompt or ""])
    if needs_probe(cfg.selector) and model is not None:
        with torch.no_grad():
            refs = [im * 2 - 1 for im in images]
            model.check_references(refs, 1)
            seq = model.ref_embedder.forward(refs)  # .forward, not the module call: no hooks, the dense tokens
            ids = tokenize(prompt or "", model.config.max_prompt_len)
            _probe_views(model, seq, views, ids)
    mask = keep_mask(views, cfg)[0]
    out, start = [], 0
    for v in views:
        h, w = v.grid
        out.append(mask[start:start + h * w].reshape(h, w))
        start += h * w
    return out


def draw_selection(image: Tensor, mask: Tensor, scale: int = 256) -> Image.Image:
    """One reference ``(1, 3, S, S)`` with its kept tokens ``(h, w)`` bright and outlined, the rest dimmed."""
    h, w = mask.shape
    img = F.interpolate(image, size=(scale, scale), mode="nearest")[0]
    cell = F.interpolate(mask[None, None].float(), size=(scale, scale), mode="nearest")[0]
    shown = img * (0.25 + 0.75 * cell)
    pil = Image.fromarray((shown.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())
    draw = ImageDraw.Draw(pil)
    ch, cw = scale / h, scale / w
    for r, c in mask.nonzero().tolist():
        draw.rectangle([c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1], outline=(255, 220, 0))
    draw.text((4, 4), f"{int(mask.sum())}/{h * w}", fill=(255, 255, 255))
    return pil


def save_selection_map(refs: list[Path], selector: str, keep: float, out: Path, *, prompt: str | None = None,
                       adaptive: bool = False, mass: float = 0.9, allocate: str = "auto", seed: int = 0,
                       model: str | None = None, image_size: int = 32, patch_size: int = 4,
                       scale: int = 256) -> list[Tensor]:
    """Draw the tokens ``selector`` keeps of each reference side by side into ``out`` (PNG); returns the masks.

    image_size / patch_size: the token grid (RefDiT's 32 px / 4 px unless ``model`` says otherwise).
    model: a shipped model name or checkpoint path, needed by ``selector="attention"`` (its probe).
    """
    if isinstance(refs, (str, os.PathLike)):  # a str would be read character by character as paths
        raise TypeError(f"refs must be a list of image paths, got the single path {str(refs)!r}: pass [path]")
    if not refs:
        raise ValueError("save_selection_map needs at least one reference image")
    cfg = SparseContextConfig(keep=keep, selector=selector, adaptive=adaptive, mass=mass, allocate=allocate,
                              seed=seed)
    net = None
    if model is not None:
        from .models import load_model

        net = load_model(model)
        image_size, patch_size = net.config.image_size, net.config.patch_size
    elif needs_probe(selector):
        raise ValueError(f"selector {selector!r} probes a model's attention: pass model='refdit-sparse' (or a path)")
    else:  # no model: the grid given here (a model's config is checked when it is built)
        image_size = checks.integer("image_size", image_size, lo=1)
        patch_size = checks.integer("patch_size", patch_size, lo=1)
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    grid = image_size // patch_size
    scale = checks.integer("scale", scale, lo=grid)  # every token at least one pixel wide
    images = _load_refs([Path(p) for p in refs], image_size)
    masks = selection_masks(images, cfg, patch_size, prompt, net)
    tiles = [draw_selection(im, m, scale) for im, m in zip(images, masks)]
    canvas = Image.new("RGB", (scale * len(tiles) + 8 * (len(tiles) - 1), scale), (0, 0, 0))
    for i, t in enumerate(tiles):
        canvas.paste(t, (i * (scale + 8), 0))
    save_png(canvas, out)  # atomic; nothing half-written on failure
    return masks
