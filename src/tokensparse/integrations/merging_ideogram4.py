"""Token merging on Ideogram 4 (``Ideogram4Transformer2DModel``, ``Ideogram4Pipeline``): the image tokens of every
block.

The pipeline packs each sample as ``[left padding, text (T), image (N)]`` (its ``unconditional_transformer``: the
image alone), a per-token ``indicator`` telling the roles apart (2: image) and ``position_ids (B, L, 3)`` giving the
image tokens' ``(t, h, w)`` rotary coordinates from ``IMAGE_POSITION_OFFSET`` (65536): the grid is read from those
rows (nothing merges where the image tokens are not the last ``N`` of every sample, nor a row-major grid from the
offset, the same in every sample). Every ``Ideogram4TransformerBlock`` runs the whole sequence through ``attention``
and ``feed_forward``; both merge the image, the last ``N`` tokens. The block-diagonal segment mask ``(B, 1, L, L)``
keeps the kept tokens' rows and columns; the RoPE table ``(cos, sin)``, each ``(B, L, D)``, has a batch axis: each
sample gets its own matching, its kept tokens their own rows. The text is never merged. The model's timestep rises
over a generation (0 is noise): steps are counted from ``1 - timestep``.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from ..merging import Matching
from .calls import as_keywords, first_arg
from .merging_blocks import Sublayer, merge_block, row_major_grid, trailing_grid
from .merging_core import TokenMergingState, observe_calls
from .merging_spans import merge_span

IMAGE = 2  # diffusers' OUTPUT_IMAGE_INDICATOR
OFFSET = 65536  # diffusers' IMAGE_POSITION_OFFSET: the image's first (t, h, w)


def wire_ideogram4(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook ``attention`` (with its RoPE rows; its segment mask along) and ``feed_forward`` of each block in
    ``blocks``; the grid comes from the ``indicator`` and ``position_ids`` the model is called with."""
    box: dict[str, Any] = {"grid": None}
    observe_calls(model, state, _observe, box)
    for name, blk in blocks:
        merge_block(state, name, Sublayer(blk.attention, "hidden_states", rope=_rope),
                    Sublayer(blk.feed_forward, "x"), functools.partial(trailing_grid, box))


def image_grid(ids: Any, indicator: Any) -> tuple[int, int] | None:
    """``(h, w)`` where the image tokens (``indicator == 2``) are the last ``n`` of every sample and their rows of
    ``ids (B, L, 3)`` a row-major ``h x w`` grid's ``(0, row, column)`` coordinates from the image offset in each,
    else ``None``."""
    if not isinstance(ids, Tensor) or not isinstance(indicator, Tensor) or ids.dim() != 3 or ids.shape[-1] != 3:
        return None
    if indicator.shape != ids.shape[:2]:
        return None
    image = indicator == IMAGE
    n = int(image[0].sum().item())
    if n == 0 or not image[:, ids.shape[1] - n:].all() or int(image.sum().item()) != n * ids.shape[0]:
        return None
    return row_major_grid(ids[:, ids.shape[1] - n:] - OFFSET)


def _observe(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    box["grid"] = image_grid(call.get("position_ids"), call.get("indicator"))
    t = first_arg(call, "timestep")
    state.observe(1.0 - t if t is not None else None, call, box["grid"])  # Ideogram 4's t rises (0: noise)


def _rope(args: tuple, kwargs: dict, m: Matching, n: int, span: tuple[int, int]) -> tuple[tuple, dict]:
    """``image_rotary_emb = (cos, sin)``, each ``(B or 1, n, D)``: each sample's kept tokens keep their own rows."""
    rope = kwargs.get("image_rotary_emb")
    if not isinstance(rope, tuple) or not all(isinstance(t, Tensor) and t.dim() == 3 for t in rope):
        return args, kwargs
    rows = tuple(merge_span(m, t.expand(m.batch_size, *t.shape[1:]), span, mode="keep") for t in rope)
    return args, {**kwargs, "image_rotary_emb": rows}
