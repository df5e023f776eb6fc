"""Token merging on CogView3-Plus (``CogView3PlusTransformer2DModel``, ``CogView3PlusPipeline``): the image tokens of
every block.

The model patchifies the latent ``(B, C, H, W)`` into a row-major ``H/p x W/p`` grid and adds its learned positional
table there, once: the blocks take no positional table and no mask. Each ``CogView3PlusTransformerBlock`` keeps two
streams, the image tokens (the grid, nothing else) and the text tokens. Its attention ``attn1`` takes the image
stream as ``hidden_states`` and joins the text to it inside (its first output, the image's, unmerged; the text's
passes). Its ``ff`` runs once on ``[text, image]`` concatenated: the image is the span after the text, merged there
(``Sublayer(at_end=True)``), the text passing whole. No positional table or mask ties the samples of a batch: each
gets its own matching.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from .merging_blocks import Sublayer, merge_block, trailing_grid
from .merging_core import TokenMergingState, observe_calls, observe_latent


def wire_cogview3plus(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook ``attn1`` (its image stream) and ``ff`` (the image span at the end of ``[text, image]``) of each block;
    the grid comes from the latent the model is called with."""
    box: dict[str, Any] = {"grid": None}
    observe_calls(model, state, observe_latent, box, 2)
    for name, blk in blocks:
        merge_block(state, name, Sublayer(blk.attn1, "hidden_states"),
                    Sublayer(blk.ff, "hidden_states", at_end=True), functools.partial(trailing_grid, box))

