"""Token merging on Krea 2 (``Krea2Transformer2DModel``, ``Krea2Pipeline``): the image tokens of every block.

The pipeline packs the latent into ``(B, N, C)`` tokens, a row-major ``h x w`` grid whose ``(t, h, w)`` rotary
coordinates it passes as ``position_ids (T + N, 3)``, the text's first (all zero), the image's after them: the grid
is read from those rows (nothing merges where they are not a row-major grid from 0). Every ``Krea2TransformerBlock``
runs one sequence ``[text (T), image (N)]`` through ``attn`` and ``ff``; both merge the image, the last ``N`` tokens.
The key mask ``(B, 1, 1, T + N)`` keeps the text's entries and the kept image tokens'; the RoPE table ``(cos, sin)``,
each ``(T + N, D)``, has no batch axis: the kept tokens keep their rows, and one matching (from the batch's mean
tokens) serves the batch, as in FLUX. The text (and the text-fusion stage, which sees only the text) is never merged.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from .calls import as_keywords, first_arg
from .merging_blocks import Sublayer, merge_block, row_major_grid, trailing_grid
from .merging_cogview4 import rope_rows
from .merging_core import TokenMergingState, observe_calls


def wire_krea2(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook ``attn`` (with its RoPE rows; its key mask along) and ``ff`` of each block in ``blocks``; the grid comes
    from the image rows of the ``position_ids`` the model is called with."""
    box: dict[str, Any] = {"grid": None}
    observe_calls(model, state, _observe, box)
    for name, blk in blocks:
        merge_block(state, name, Sublayer(blk.attn, "hidden_states", rope=rope_rows),
                    Sublayer(blk.ff, "hidden_states"), functools.partial(trailing_grid, box), shared=True)


def image_grid(ids: Any, n: int) -> tuple[int, int] | None:
    """``(h, w)`` where the last ``n`` rows of ``ids (L, 3)`` are a row-major ``h x w`` grid's ``(0, row, column)``
    coordinates from 0, else ``None``."""
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[-1] != 3 or not 0 < n <= ids.shape[0]:
        return None
    return row_major_grid(ids[-n:])


def _observe(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    x = call.get("hidden_states")
    box["grid"] = image_grid(call.get("position_ids"), x.shape[1]) if isinstance(x, Tensor) and x.dim() == 3 else None
    state.observe(first_arg(call, "timestep"), call, box["grid"])

