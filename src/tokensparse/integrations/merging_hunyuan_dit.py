"""Token merging on HunyuanDiT (``HunyuanDiT2DModel``, ``HunyuanDiTPipeline`` and its ControlNet / PAG variants): the
image tokens of every block, in its self-attention, its cross-attention's queries and its feed-forward.

The model patchifies the latent ``(B, C, H, W)`` into a row-major ``H/p x W/p`` grid; every ``HunyuanDiTBlock`` sees
those tokens and nothing else (the BERT and T5 captions enter as the cross-attention's keys, never merged; no mask:
the model fills their padding with learned tokens). The blocks of the second half first join their input with a long
skip from the first half (a linear layer over both, on the whole grid); then ``attn1``, ``attn2`` and ``ff`` run, each
merged on its own input. Both attentions rotate their queries (``attn1`` its keys too) by a RoPE table ``(cos,
sin)``, each ``(N, D)`` with no batch axis: each kept token keeps its own row, and one matching, from the batch's mean
tokens, serves the batch (as in FLUX and CogView4).
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from .calls import as_keywords, first_arg
from .merging_blocks import BlockMerger, Sublayer, whole_grid
from .merging_cogview4 import rope_rows
from .merging_core import TokenMergingState, observe_calls


def hunyuan_dit_sublayers(blk: nn.Module, cfg: Any) -> list[Sublayer]:
    """The sublayers of a ``HunyuanDiTBlock`` that ``cfg`` merges: ``attn1`` (``merge_attn``), ``attn2``
    (``merge_cross``; its queries), ``ff`` (``merge_mlp``), in call order; both attentions with their RoPE rows."""
    subs = [Sublayer(blk.attn1, "hidden_states", rope=rope_rows)] if cfg.merge_attn else []
    if cfg.merge_cross:
        subs.append(Sublayer(blk.attn2, "hidden_states", rope=rope_rows))
    if cfg.merge_mlp:
        subs.append(Sublayer(blk.ff, "hidden_states"))
    return subs


def wire_hunyuan_dit(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook the sublayers :func:`hunyuan_dit_sublayers` selects in each block of ``blocks``; the grid comes from the
    latent the model is called with."""
    box: dict[str, Any] = {"grid": None}
    observe_calls(model, state, _observe, box)
    for name, blk in blocks:
        subs = hunyuan_dit_sublayers(blk, state.cfg)
        if subs:
            BlockMerger(state, name, subs, functools.partial(whole_grid, box), shared=True)


def _observe(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    x, rope = call.get("hidden_states"), call.get("image_rotary_emb")
    box["grid"] = None
    if isinstance(x, Tensor) and x.dim() == 4:
        p = int(module.config.get("patch_size", 2) or 1)
        h, w = x.shape[-2] // p, x.shape[-1] // p
        # no table, or a (cos, sin) with one row per image token; anything else runs unmerged
        if rope is None or (isinstance(rope, (tuple, list)) and len(rope) == 2
                            and all(isinstance(t, Tensor) and t.dim() == 2 and t.shape[0] == h * w for t in rope)):
            box["grid"] = (h, w)
    state.observe(first_arg(call, "timestep"), call, box["grid"])

