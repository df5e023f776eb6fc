"""Token merging on CogView4 (``CogView4Transformer2DModel``, ``CogView4Pipeline``): the image stream of every block.

Each ``CogView4TransformerBlock`` keeps two streams, the image tokens (a row-major ``H/p x W/p`` grid of the latent
``(B, C, H, W)``, nothing else) and the text tokens. Its attention ``attn1`` joins them as ``[text, image]``, rotating
the image part by a RoPE table ``(cos, sin)``, each ``(N, D)`` with no batch axis (so one matching, from the batch's
mean tokens, serves the batch, as in FLUX); its optional text key mask ``(B, T)`` covers the text only. Its ``ff``
runs on the image stream, then, the same module, on the text stream: only that first call merges. The text stream
is never merged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..merging import Matching
from .calls import as_keywords, first_arg
from .merging_blocks import Sublayer, merge_block, whole_grid
from .merging_core import TokenMergingState, observe_calls


def wire_cogview4(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState,
                  observe: Callable[..., None] | None = None) -> None:
    """Hook ``attn1`` (image stream, its RoPE rows) and ``ff`` (its image-stream call) of each block; ``observe``
    (default: CogView4's) reads each model call's grid into ``box["grid"]`` (GLM-Image passes its own)."""
    box: dict[str, Any] = {"grid": None}
    observe_calls(model, state, observe or _observe, box)
    for name, blk in blocks:
        merge_block(state, name, Sublayer(blk.attn1, "hidden_states", rope=rope_rows),
                    Sublayer(blk.ff, "hidden_states", first_call=True), functools.partial(whole_grid, box), shared=True,
                    block=blk)


def _observe(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    x, rope = call.get("hidden_states"), call.get("image_rotary_emb")
    box["grid"] = None
    if isinstance(x, Tensor) and x.dim() == 4:
        p = int(module.config.get("patch_size", 2))
        h, w = x.shape[-2] // p, x.shape[-1] // p
        # the model's own table, or a caller's (cos, sin) with one row per image token; anything else runs unmerged
        if rope is None or (isinstance(rope, tuple) and len(rope) == 2
                            and all(isinstance(t, Tensor) and t.dim() == 2 and t.shape[0] == h * w for t in rope)):
            box["grid"] = (h, w)
    state.observe(first_arg(call, "timestep"), call, box["grid"])


_grid = whole_grid  # the name merged models pickled before 0.22.0 refer to


def rope_rows(args: tuple, kwargs: dict, m: Matching, n: int, span: tuple[int, int]) -> tuple[tuple, dict]:
    """``image_rotary_emb = (cos, sin)``, each ``(n, D)``, one row per token of the sublayer's input (CogView4, FLUX.3):
    the rows around ``span`` and the span's kept tokens' (one matching for the batch)."""
    rope = kwargs.get("image_rotary_emb")
    if rope is None:
        return args, kwargs
    start, length = span
    keep = m.keep[0]

    def sub(t: Tensor) -> Tensor:
        return torch.cat([t[:start], t[start:start + length][keep], t[start + length:]], dim=0)

    return args, {**kwargs, "image_rotary_emb": tuple(sub(t) for t in rope)}
