"""Token merging on Lumina-Next (``LuminaNextDiT2DModel``, ``LuminaPipeline``): the image tokens of every block.

The model patchifies the latent ``(B, C, H, W)`` into a row-major ``H/p x W/p`` grid; every ``LuminaNextDiTBlock``
sees those tokens and nothing else. Its two attentions both take them as queries: ``attn1`` attends over them
(passed again as ``encoder_hidden_states``, its keys: they merge with it; its key mask ``(B, N)`` keeps the kept
tokens' entries), ``attn2`` over the caption (its key mask passes as it is). Both return per-head outputs ``(B, N,
heads, head_dim)``, unmerged; the block sums them and projects the sum through ``attn2.to_out[0]``, a linear layer
that merges its input again (each merged group holds one value there, repeated: the merged projection up to
rounding). ``feed_forward`` merges too. The RoPE table ``(1, N, D/2)`` rides along as ``query_rotary_emb`` and
``key_rotary_emb``: each sample's kept tokens keep their own rows (it is expanded to the batch, so each sample gets its
own matching). The pipeline's proportional attention scales ``attn1``'s logits by ``sqrt(log_base N)`` of its query
count ``N``; merged, that count would fall: the base is moved so that the scale stays the unmerged grid's.
Lumina-Next's timestep rises over a generation (``1 - t/1000``): steps are counted from ``1 - timestep``. The caption
is never merged.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from torch import Tensor, nn

from ..merging import Matching
from .calls import as_keywords, first_arg
from .merging_blocks import BlockMerger, Sublayer, whole_grid
from .merging_core import TokenMergingState, latent_grid, observe_calls
from .merging_spans import merge_span


def lumina_next_sublayers(blk: nn.Module, cfg: Any) -> list[Sublayer]:
    """The sublayers of a ``LuminaNextDiTBlock`` that ``cfg`` merges, in call order: ``attn1``, ``attn2`` and the
    projection ``attn2.to_out[0]`` of their summed outputs (``merge_attn``; the projection followed where peft's LoRA
    replaces it), and ``feed_forward`` (``merge_mlp``)."""
    subs = []
    if cfg.merge_attn:
        subs += [Sublayer(blk.attn1, "hidden_states", rope=_rope, self_context=True),
                 Sublayer(blk.attn2, "hidden_states", rope=_rope),
                 Sublayer(blk.attn2.to_out[0], "input", attr="attn2.to_out.0")]
    if cfg.merge_mlp:
        subs.append(Sublayer(blk.feed_forward, "x"))
    return subs


def wire_lumina_next(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook the sublayers :func:`lumina_next_sublayers` selects in each block of ``blocks``; the grid comes from the
    latent the model is called with."""
    box: dict[str, Any] = {"grid": None}
    observe_calls(model, state, _observe, box)
    for name, blk in blocks:
        subs = lumina_next_sublayers(blk, state.cfg)
        if subs:
            BlockMerger(state, name, subs, functools.partial(whole_grid, box), block=blk)


def _observe(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    box["grid"] = latent_grid(module, call.get("hidden_states"))
    t = first_arg(call, "timestep")
    state.observe(1.0 - t if t is not None else None, call, box["grid"])  # Lumina's t rises (1 - t/1000)


def proportional_base(base: float, n: int, kept: int) -> float:
    """The ``base_sequence_length`` under which ``kept`` queries get the softmax scale ``sqrt(log_base n)`` that the
    processor gives ``n`` queries under ``base`` (``log_b' kept = log_base n``); ``base`` itself where ``n`` or
    ``kept`` is below 2 (one query: the scale does not matter, or no scale to keep)."""
    if n < 2 or kept < 2 or base <= 1:
        return base
    return base ** (math.log(kept) / math.log(n))


def _rope(args: tuple, kwargs: dict, m: Matching, n: int, span: tuple[int, int]) -> tuple[tuple, dict]:
    """``query_rotary_emb`` / ``key_rotary_emb (1 or B, N, D/2)``: each sample's kept tokens keep their own rows;
    with merged keys (``attn1``), ``base_sequence_length`` moved to keep the proportional scale."""
    out, done = dict(kwargs), {}
    for key in ("query_rotary_emb", "key_rotary_emb"):
        rope = kwargs.get(key)
        if isinstance(rope, Tensor) and rope.dim() == 3 and rope.shape[1] == n:
            if id(rope) not in done:  # attn1 passes one table as both
                done[id(rope)] = merge_span(m, rope.expand(m.batch_size, *rope.shape[1:]), span, mode="keep")
            out[key] = done[id(rope)]
    base = kwargs.get("base_sequence_length")
    if kwargs.get("key_rotary_emb") is not None and isinstance(base, (int, float)):
        out["base_sequence_length"] = proportional_base(base, n, n - m.num_merged)
    return args, out
