"""Token merging on PRX (``PRXTransformer2DModel``, ``PRXPipeline``): the image tokens of every block.

The model patchifies the latent ``(B, C, H, W)`` into a row-major ``H/p x W/p`` grid; every ``PRXBlock`` sees those
tokens and nothing else. Its ``attention`` takes them as queries (and keys, after the text's keys, which it projects
itself from ``encoder_hidden_states``): the image tokens merge with their rows of the RoPE table ``(B, 1, N, D/2, 2,
2)``; the key mask ``(B, T)`` covers the text only and passes as it is. The block's gated MLP is three linear layers
called inline (``down_proj(act(gate_proj(x)) * up_proj(x))``): each merges its input and unmerges its output, so
``down_proj`` merges what the other two gave each merged group (one value per group, repeated), which computes
the merged MLP up to rounding. The RoPE table has a batch axis: each sample gets its own matching. The text is never
merged.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from ..merging import Matching
from .merging_blocks import BlockMerger, Sublayer, whole_grid
from .merging_core import TokenMergingState, observe_calls, observe_latent
from .merging_spans import merge_span

_MLP = ("gate_proj", "up_proj", "down_proj")


def prx_sublayers(blk: nn.Module, cfg: Any) -> list[Sublayer]:
    """The sublayers of a ``PRXBlock`` that ``cfg`` merges: ``attention`` (``merge_attn``, with its RoPE rows) and the
    MLP's three linear layers (``merge_mlp``; followed where peft's LoRA replaces them), in call order."""
    subs = [Sublayer(blk.attention, "hidden_states", rope=_rope)] if cfg.merge_attn else []
    if cfg.merge_mlp:
        subs += [Sublayer(getattr(blk, key), "input", attr=key) for key in _MLP]
    return subs


def wire_prx(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook the sublayers :func:`prx_sublayers` selects in each block of ``blocks``; the grid comes from the latent
    the model is called with."""
    box: dict[str, Any] = {"grid": None}
    observe_calls(model, state, observe_latent, box, 2)
    for name, blk in blocks:
        subs = prx_sublayers(blk, state.cfg)
        if subs:
            BlockMerger(state, name, subs, functools.partial(whole_grid, box), block=blk)


def _rope(args: tuple, kwargs: dict, m: Matching, n: int, span: tuple[int, int]) -> tuple[tuple, dict]:
    """``image_rotary_emb (B, 1, N, D/2, 2, 2)``: each sample's kept tokens keep their own rows."""
    rope = kwargs.get("image_rotary_emb")
    if not isinstance(rope, Tensor) or rope.dim() < 3 or rope.shape[1] != 1:
        return args, kwargs
    rows = merge_span(m, rope.expand(m.batch_size, *rope.shape[1:])[:, 0], span, mode="keep")
    return args, {**kwargs, "image_rotary_emb": rows.unsqueeze(1)}
