"""Token merging on ERNIE-Image (``ErnieImageTransformer2DModel``, ``ErnieImagePipeline``): the image tokens in every
block.

The model patchifies the latent ``(B, C, H, W)`` into a row-major ``H/p x W/p`` grid and runs one sequence ``[image,
text]`` through single-stream blocks (``ErnieImageSharedAdaLNBlock``), kept sequence first, ``(S, B, C)``. Each
block's ``self_attention`` takes it batch first, with a key mask ``(B, 1, 1, S)`` (every image token visible, the
text's padding hidden) and a RoPE table ``(B, S, 1, D)``; its ``mlp`` takes it sequence first (``Sublayer(
seq_first=True)``). Both merge the grid, the first ``h * w`` tokens: the mask and the table keep the kept tokens'
rows and all the text's. The table has a batch axis (the image's position ids hold each sample's text length), so
each sample gets its own matching. The text is never merged.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from ..merging import Matching
from .merging_blocks import Sublayer, leading_grid, merge_block
from .merging_core import TokenMergingState, observe_calls, observe_latent
from .merging_spans import merge_span


def wire_ernie_image(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook ``self_attention`` (with its RoPE rows; its key mask along) and ``mlp`` (sequence first) of each block in
    ``blocks``; the grid comes from the latent the model is called with."""
    box: dict[str, Any] = {"grid": None}
    observe_calls(model, state, observe_latent, box, 1)
    for name, blk in blocks:
        merge_block(state, name, Sublayer(blk.self_attention, "hidden_states", rope=_rope),
                    Sublayer(blk.mlp, "x", seq_first=True), functools.partial(leading_grid, box))


def _rope(args: tuple, kwargs: dict, m: Matching, n: int, span: tuple[int, int]) -> tuple[tuple, dict]:
    """``image_rotary_emb (B, S, 1, D)``: each sample's kept grid tokens keep their own rows; the text's all stay."""
    rope = kwargs.get("image_rotary_emb")
    if not isinstance(rope, Tensor):
        return args, kwargs
    return args, {**kwargs, "image_rotary_emb": merge_span(m, rope.expand(m.batch_size, *rope.shape[1:]), span,
                                                           mode="keep")}
