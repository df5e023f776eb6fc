"""Token merging on OmniGen (``OmniGenTransformer2DModel``, ``OmniGenPipeline``): the target image's tokens in every
block.

The transformer runs one Phi-3-style decoder over ``[text with the input images at their placeholders, time token,
target]`` (see :mod:`.diffusers_omnigen`), left-padded, with a ``(B, S, S)`` 0/1 mask made additive ``(B, 1, S, S)``:
causal over the text, the time token and every row of the prefix, bidirectional within each image. The target, last,
attends to every (unpadded) token; nothing before it attends to the target (its columns are masked in every prefix
row; the padding rows, which see it, are read by nothing). So merging the target grid -- the row-major ``H/p x W/p``
grid of the latent ``hidden_states``, the last ``h * w`` tokens -- leaves the text, the input images and the time
token computed exactly as unmerged.

Each block's ``self_attn`` (its tokens passed again as ``encoder_hidden_states``: merged along) and ``mlp`` merge that
trailing span. The mask is a query x key mask over the sequence: it keeps the surviving tokens' rows and columns (the
target's rows and columns are alike, so no merged pair straddles it). The RoPE table ``image_rotary_emb = (cos, sin)``,
``(S, D)`` each, has no batch axis (diffusers computes it from ``position_ids[0]``): one matching, from the batch's
mean tokens, serves the batch, and each kept target token keeps its own rows. Under Sparse Context the attention
processors run row by row with their own RoPE rows (:class:`~.diffusers_omnigen.RowRope`): they thin those the same
way (:func:`~.merging_blocks.active_merge`).
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from ..merging import Matching
from .calls import as_keywords, first_arg
from .merging_blocks import Sublayer, merge_block, trailing_grid
from .merging_core import TokenMergingState, latent_grid, observe_calls
from .merging_spans import keep_rows


def wire_omnigen(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook ``self_attn`` (its keys, RoPE rows and mask along) and ``mlp`` of each block in ``blocks``; the target grid
    comes from the latent ``hidden_states (B, C, H, W)`` the model is called with."""
    box: dict[str, Any] = {"grid": None}
    observe_calls(model, state, _observe, box)
    for name, blk in blocks:
        merge_block(state, name, Sublayer(blk.self_attn, "hidden_states", rope=_rope, self_context=True),
                    Sublayer(blk.mlp, "hidden_states"), functools.partial(trailing_grid, box), shared=True)


def _observe(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    box["grid"] = latent_grid(module, call.get("hidden_states"))
    state.observe(first_arg(call, "timestep"), call, box["grid"])


def _rope(args: tuple, kwargs: dict, m: Matching, n: int, span: tuple[int, int]) -> tuple[tuple, dict]:
    """``image_rotary_emb = (cos, sin)``, ``(n, D)`` each: the rows of the kept target tokens and all others (one
    matching for the batch: the table has no batch axis)."""
    rope = kwargs.get("image_rotary_emb")
    if not isinstance(rope, (tuple, list)) or not all(isinstance(t, Tensor) and t.shape[0] == n for t in rope):
        return args, kwargs
    return args, {**kwargs, "image_rotary_emb": tuple(keep_rows(t, m, span) for t in rope)}
