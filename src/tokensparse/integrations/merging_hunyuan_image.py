"""Token merging on HunyuanImage 2.1 (``HunyuanImageTransformer2DModel``: ``HunyuanImagePipeline``, and the refiner's
one-frame latents): the image tokens in every double- and single-stream block.

The model patchifies the latent ``(B, C, H, W)`` (the refiner's ``(B, C, 1, H, W)``) into a row-major ``H/p x W/p``
grid. Its double-stream blocks (``HunyuanImageTransformerBlock``) keep the image and the text apart: ``attn`` joins
them as ``[image, text]`` (its first output, the image's, unmerged; the text's passes) and ``ff`` runs on the image
alone (the text's ``ff_context`` is left alone). Its single-stream blocks (``HunyuanImageSingleTransformerBlock``)
normalise ``[image, text]`` as one sequence, then run ``proj_mlp`` on all of it (the image first: merged) and ``attn``
on the two parts as in the double-stream blocks. ``attn`` rotates the image by a RoPE table ``(cos, sin)``, each
``(N, D)`` with no batch axis: the kept tokens keep their rows, and one matching (from the batch's mean tokens)
serves the batch, as in FLUX. The key mask ``(B, 1, 1, N + T)`` over ``[image, text]`` (the text's padding) keeps the
kept image tokens' entries and the text's. The text refiner sees the text alone: never merged.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from .calls import as_keywords, first_arg
from .merging_blocks import BlockMerger, Sublayer, leading_grid
from .merging_cogview4 import rope_rows
from .merging_core import TokenMergingState, observe_calls


def wire_hunyuan_image(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook ``attn`` (image side, RoPE rows, key mask) and ``ff`` (double-stream) or ``proj_mlp`` (single-stream)
    of each block in ``blocks`` (a single-stream block is one with a ``proj_mlp``)."""
    box: dict[str, Any] = {"grid": None}
    observe_calls(model, state, _observe, box)
    cfg = state.cfg
    for name, blk in blocks:
        attn = [Sublayer(blk.attn, "hidden_states", rope=rope_rows, context_last=True)] if cfg.merge_attn else []
        mlp = getattr(blk, "proj_mlp", None)
        if mlp is None:  # double-stream: attn, then ff
            subs = attn + ([Sublayer(blk.ff, "hidden_states")] if cfg.merge_mlp else [])
        else:  # single-stream: proj_mlp runs first (the first merged sublayer of a call finds the matching)
            # a Linear: peft's LoRA may replace it (its hooks follow the module at block.proj_mlp)
            subs = ([Sublayer(mlp, "input", attr="proj_mlp")] if cfg.merge_mlp else []) + attn
        if subs:
            BlockMerger(state, name, subs, functools.partial(leading_grid, box), shared=True, block=blk)


def _observe(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    x = call.get("hidden_states")
    patch = tuple(int(p) for p in module.config.get("patch_size", (1, 1)))
    box["grid"] = None
    if isinstance(x, Tensor) and x.dim() == 4 and len(patch) == 2:
        box["grid"] = (x.shape[-2] // patch[0], x.shape[-1] // patch[1])
    elif isinstance(x, Tensor) and x.dim() == 5 and len(patch) == 3 and x.shape[2] // patch[0] == 1:
        box["grid"] = (x.shape[-2] // patch[1], x.shape[-1] // patch[2])  # one latent frame (the refiner's)
    state.observe(first_arg(call, "timestep"), call, box["grid"])
