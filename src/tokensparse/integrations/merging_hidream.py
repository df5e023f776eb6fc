"""Token merging on HiDream-I1 (``HiDreamImageTransformer2DModel``, ``HiDreamImagePipeline``): the image tokens in every
double- and single-stream block.

The model patchifies the latent ``(B, C, H, W)`` into a row-major ``H/p x W/p`` grid; a non-square latent's grid is
padded to ``max_seq`` tokens, the padding marked by ``hidden_states_masks (B, max_seq)`` (its keys zeroed). Every
block's sequence starts with that grid: the double-stream blocks (``HiDreamImageTransformerBlock``) keep the image
(and its padding) apart from the text, which their attention ``attn1`` joins after it (its first output, the image's,
unmerged; the text's passes) and which has its own ``ff_t``, left alone; the single-stream blocks
(``HiDreamImageSingleTransformerBlock``) run ``[image, padding, text]`` as one sequence. In both, ``attn1`` and the
image's (mixture-of-experts) feed-forward ``ff_i`` merge the grid span. The RoPE table ``(B, L, 1, D/2, 2, 2)`` over
the whole sequence and the key mask (positional, after the tokens) keep the kept tokens' rows; the table has a batch
axis, so each sample gets its own matching.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from ..merging import Matching
from .calls import as_keywords, first_arg
from .merging_blocks import Sublayer, leading_grid, merge_block
from .merging_core import TokenMergingState, observe_calls
from .merging_spans import merge_span


def wire_hidream(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook ``attn1`` (with its RoPE rows and key mask; a double-stream block's: its image output) and ``ff_i`` of each
    block in ``blocks``; the grid comes from the latent the model is called with."""
    box: dict[str, Any] = {"grid": None}
    observe_calls(model, state, _observe, box)
    for name, blk in blocks:
        merge_block(state, name, Sublayer(blk.attn1, "norm_hidden_states", rope=_rope), Sublayer(blk.ff_i, "x"),
                    functools.partial(leading_grid, box))


def _observe(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    x = call.get("hidden_states")
    box["grid"] = None
    if isinstance(x, Tensor) and x.dim() == 4:  # (B, C, H, W); pre-patchified (B, N, C) calls run unmerged
        p = int(module.config.get("patch_size", 2) or 1)
        box["grid"] = (x.shape[-2] // p, x.shape[-1] // p)
    state.observe(first_arg(call, "timesteps", "timestep"), call, box["grid"])


def _rope(args: tuple, kwargs: dict, m: Matching, n: int, span: tuple[int, int]) -> tuple[tuple, dict]:
    """``attn1(tokens, hidden_states_masks, text, image_rotary_emb=...)``: the mask ``(B, L)`` and the RoPE table
    ``(B, L, ...)`` keep the rows of the kept grid tokens and all others."""
    rope = kwargs.get("image_rotary_emb")
    if isinstance(rope, Tensor):
        rope = merge_span(m, rope.expand(m.batch_size, *rope.shape[1:]), span, mode="keep")
        kwargs = {**kwargs, "image_rotary_emb": rope}
    if len(args) > 1 and isinstance(args[1], Tensor):
        args = (args[0], _mask(m, args[1], span), *args[2:])
    elif isinstance(kwargs.get("hidden_states_masks"), Tensor):
        kwargs = {**kwargs, "hidden_states_masks": _mask(m, kwargs["hidden_states_masks"], span)}
    return args, kwargs


def _mask(m: Matching, mask: Tensor, span: tuple[int, int]) -> Tensor:
    return merge_span(m, mask.expand(m.batch_size, *mask.shape[1:]), span, mode="keep")
