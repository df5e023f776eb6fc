"""Token merging on FLUX.3 (``Flux3Transformer2DModel``, its modular pipelines): the target's tokens in every block that
sees them.

The transformer takes three token modes apart: the target ``hidden_states (B, N, C)`` with ``img_ids (N, 4)`` = (T, H,
W, L), the references ``image_cond_hidden_states`` with their own ``image_cond_ids``, and the text. Its per-mode blocks
(``Flux3ModeTransformerBlock``) run each mode alone: the target's, ``mode_blocks["image"]``, see the target's ``N``
tokens and nothing else (RoPE ``(cos, sin)``, each ``(N, D)``); the references' and the text's are left alone. Its
single blocks (``Flux3SingleTransformerBlock``) run ``[text, target, references]`` as one sequence, with one RoPE table
over all of it: the target is the span after the text (as long as the model call's ``encoder_hidden_states``). In
both, attention ``attn`` and feed-forward ``ff`` run in parallel on the same modulated input; both merge it, the RoPE
rows of the kept target tokens along. The tables have no batch axis: one matching (from the batch's mean tokens) serves
the batch, as in FLUX. No attention mask is passed. The pipeline scales the target's H / W ids (0.5: not integers):
its grid is the distinct values of each, in row-major order.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import Tensor, nn

from .calls import as_keywords, first_arg
from .diffusers_flux3 import grid_cells
from .merging_blocks import Sublayer, merge_block
from .merging_cogview4 import rope_rows
from .merging_core import TokenMergingState, observe_calls

_IMAGE_MODE = re.compile(r"(^|\.)mode_blocks\.image\.\d+$")  # the target's per-mode blocks (not image_cond's, txt's)


def target_blocks(blocks: list[tuple[str, nn.Module]], single: type | None) -> list[tuple[str, nn.Module]]:
    """The FLUX.3 blocks that see the target's tokens: the single blocks (instances of ``single``) and the target's
    per-mode blocks (``mode_blocks.image.<i>``)."""
    return [(n, m) for n, m in blocks if (single is not None and isinstance(m, single)) or _IMAGE_MODE.search(n)]


def wire_flux3(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook ``attn`` (with the target's RoPE rows) and ``ff`` of each block of ``blocks`` (:func:`target_blocks`)."""
    box: dict[str, Any] = {"grid": None, "n_txt": None}
    observe_calls(model, state, _observe, box)
    for name, blk in blocks:
        joint = not _IMAGE_MODE.search(name)  # a single block: [text, target, references]
        merge_block(state, name, Sublayer(blk.attn, "hidden_states", rope=rope_rows), Sublayer(blk.ff, "x"),
                    functools.partial(_grid, box, joint), shared=True)


def _observe(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    x, ids, txt = call.get("hidden_states"), first_arg(call, "img_ids"), call.get("encoder_hidden_states")
    grid = ids_grid(ids) if isinstance(ids, Tensor) else None
    if not (isinstance(x, Tensor) and x.dim() == 3 and grid is not None and grid[0] * grid[1] == x.shape[1]):
        grid = None
    box["grid"] = grid
    box["n_txt"] = txt.shape[1] if isinstance(txt, Tensor) and txt.dim() == 3 else None
    state.observe(first_arg(call, "timestep"), call, box["grid"])


_COMPILED = ("token merging's FLUX.3 hooks must run as Python under torch.compile (traced, the merged outputs drifted "
             "from the uncompiled ones); this torch did not fall back: call the transformer uncompiled")


def _grid(box: dict, joint: bool, n: int) -> tuple[int, int, int] | None:
    """The target grid among a sublayer's ``n`` tokens: all of them (a per-mode block), or the span after the text
    (a single block; the references, if any, follow it). Never traced: under ``torch.compile(transformer)`` the
    error makes dynamo run the merged blocks' hooks as Python, which keeps their outputs exact (traced, they drifted
    from the uncompiled ones from the second step on)."""
    if torch.compiler.is_compiling():
        raise RuntimeError(_COMPILED)
    g, start = box["grid"], box["n_txt"] if joint else 0
    if g is None or start is None or start + g[0] * g[1] > n or (not joint and g[0] * g[1] != n):
        return None
    return g[0], g[1], start


def ids_grid(ids: Tensor) -> tuple[int, int] | None:
    """The grid ``(h, w)`` of FLUX.3 target ids ``(N, 4)`` (or ``(B, N, 4)``, the first sample's): the distinct H and W
    values (scaled, not necessarily integers), every cell once, in row-major order; else ``None`` (no merging)."""
    ids = ids[0] if ids.dim() == 3 else ids
    if ids.dim() != 2 or ids.shape[1] < 3 or ids.shape[0] == 0:
        return None
    (rows, h), (cols, w), n = grid_cells(ids[:, 1]), grid_cells(ids[:, 2]), ids.shape[0]
    if h * w != n or not bool((rows * w + cols == torch.arange(n, device=ids.device)).all()):
        return None
    return h, w
