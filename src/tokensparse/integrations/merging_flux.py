"""Token merging on FLUX / FLUX.2 / LongCat-Image(-Edit) / Chroma / Ovis-Image / Bria 3.x / Bria FIBO transformers: the
target grid among the image tokens of every block, found from the model call's ``img_ids``.

The target is the tokens with the lowest T id, at the start or the end of the image tokens (LongCat's first id is a
modality, 1 for the target, 2 for the reference; a FLUX.1 call that numbers no token 0 is VisualCloze's, whose rows
count from 1 and whose query row, the last, holds the target). Double-stream blocks merge ``attn`` (image stream, with
its RoPE rows) and ``ff``; single-stream blocks, over text then image tokens, FLUX.2's ``attn`` (attention and MLP
fused) and the others' ``attn`` and ``proj_mlp``. The RoPE tables have no batch dimension: one matching (from the
batch's mean tokens) serves the batch. Text and reference tokens pass through unmerged. Ovis-Image's, Bria's and Bria
FIBO's blocks are FLUX.1's (own attention classes, same call and RoPE layout; Bria FIBO's pipelines pass a key mask
over ``[text, image]`` in ``joint_attention_kwargs``); Chroma's square the text padding mask into a query x key mask
``(B, 1, L, L)``, which loses the merged tokens' rows and columns.

Hooks and grid functions are module-level functions bound with ``functools.partial``, not closures, so that
``copy.deepcopy`` of a merged model copies them along with their state. :mod:`.merging_diffusers` finds the blocks
and calls :func:`wire_flux`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from ..merging import Matching
from .calls import as_keywords, first_arg
from .classes import known_name
from .merging_blocks import BlockMerger, Sublayer, merge_block
from .merging_core import TokenMergingState, observe_calls


def _flux_rope(args: tuple, kwargs: dict, m: Matching, n_img: int, span: tuple[int, int]) -> tuple[tuple, dict]:
    """Keep the RoPE rows of the text tokens, the kept target tokens and every reference token.

    FLUX's tables ``(S_txt + N, D)`` list the text first, then the image stream, in which the target grid
    is ``span`` (start, length) and any other rows are reference tokens. The tables have no batch
    dimension, so FLUX blocks use one matching per batch.
    """
    rope = kwargs.get("image_rotary_emb")
    if rope is None:
        return args, kwargs
    keep = m.keep[0]

    def sub(table: Tensor) -> Tensor:
        start = table.shape[0] - n_img + span[0]
        end = start + span[1]
        return torch.cat([table[:start], table[start:end][keep], table[end:]], dim=0)

    new = tuple(sub(t) for t in rope) if isinstance(rope, (tuple, list)) else sub(rope)
    return args, {**kwargs, "image_rotary_emb": new}


def wire_flux(model: nn.Module, double: list[tuple[str, nn.Module]], single: list[tuple[str, nn.Module]],
               state: TokenMergingState) -> None:
    """FLUX / FLUX.2: the target grid among the image tokens of every block, found from ``img_ids``.

    Double-stream blocks: ``attn`` (image stream) and ``ff``. Single-stream blocks, whose sequence is text
    then image tokens: FLUX.2's ``attn`` (attention and MLP fused in one sublayer; merged with
    ``merge_attn``), FLUX.1's and LongCat's ``attn`` and ``proj_mlp``. Text tokens, and reference tokens before or after
    the target (FLUX.1 Kontext and FLUX.2 put them after it, FLUX.2's K/V-extract call before it; thinned
    or not by Sparse Context), pass through unmerged.
    """
    cfg = state.cfg
    # of the running call, read by every block; "cloze": FLUX.1, whose VisualCloze calls number no token 0
    cloze = known_name(type(model), ("FluxTransformer2DModel",)) is not None  # a subclass too
    box: dict[str, Any] = {"grid": None, "n_txt": None, "cloze": cloze}
    observe_calls(model, state, _observe_flux, box)
    for name, blk in double:
        attn = Sublayer(blk.attn, "hidden_states", rope=_flux_rope, outputs=(0, 2), context_first=True)
        ff = getattr(blk, "ff", None)
        merge_block(state, name, attn, None if ff is None else Sublayer(ff, "hidden_states"),
                    functools.partial(_flux_grid, box, False), shared=True)
    for name, blk in single:
        subs = []
        if cfg.merge_mlp and isinstance(getattr(blk, "proj_mlp", None), nn.Module):  # FLUX.1: runs before attn
            subs.append(Sublayer(blk.proj_mlp, "input", attr="proj_mlp"))  # a Linear: peft's LoRA may replace it
        if cfg.merge_attn:
            subs.append(Sublayer(blk.attn, "hidden_states", rope=_flux_rope))
        if subs:
            BlockMerger(state, name, subs, functools.partial(_flux_grid, box, True), shared=True, block=blk)


def _observe_flux(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    ids, txt = first_arg(call, "img_ids"), first_arg(call, "encoder_hidden_states")
    box["grid"] = ids_grid(ids[0] if ids.dim() == 3 else ids, box["cloze"]) if isinstance(ids, Tensor) else None
    box["n_txt"] = txt.shape[1] if isinstance(txt, Tensor) and txt.dim() == 3 else None
    state.observe(first_arg(call, "timestep"), call, box["grid"])


def _flux_grid(box: dict, text: bool, n: int) -> tuple[int, int, int] | None:
    """The target grid among a sublayer's ``n`` tokens (text first if ``text``)."""
    if box["grid"] is None or (text and box["n_txt"] is None):
        return None
    h, w, leading = box["grid"]
    lo = box["n_txt"] if text else 0
    return None if h * w > n - lo else (h, w, lo if leading else n - h * w)


def ids_grid(ids: Tensor, cloze: bool = False) -> tuple[int, int, bool] | None:
    """The target grid in FLUX image ids ``(N, 3)`` (T, H, W) or ``(N, 4)`` (T, H, W, L): ``(h, w, leading)``.

    The target is the tokens with the lowest T id (0; LongCat's modality 1; reference tokens carry others:
    FLUX.1 Kontext 1, FLUX.2 10, 20, ..., LongCat 2). With ``cloze`` (FLUX.1) ids that number no token 0 are
    VisualCloze's: rows of its image grid from 1, the in-context examples first, the query row (with the target)
    last; there the target is the tokens with the highest T id. They must be one row-major grid, at the start of
    the sequence (``leading``) or at its end, else ``None`` (no merging).
    """
    if ids.dim() != 2 or ids.shape[1] not in (3, 4) or ids.shape[0] == 0:
        return None
    t = ids[:, 0]
    is_target = t == (t.max() if cloze and not bool((t == 0).any()) else t.min())
    n = int(is_target.sum())
    if bool(is_target[:n].all()):
        leading, part = True, ids[:n]
    elif bool(is_target[-n:].all()):
        leading, part = False, ids[-n:]
    else:
        return None
    rows, cols = part[:, 1].long(), part[:, 2].long()
    rows, cols = rows - rows.min(), cols - cols.min()
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    if h * w != n or not bool((rows * w + cols == torch.arange(n, device=ids.device)).all()):
        return None
    return h, w, leading
