"""Token merging on Qwen-Image 2.1 (``QwenImage21Transformer2DModel``, ``QwenImage21Pipeline``): the target image's
tokens in every block.

The transformer runs one joint sequence ``[text, condition image 1, text, ..., target]`` (see
:mod:`.diffusers_qwen21`) through single-stream blocks (``QwenImage21TransformerBlock``) whose attention is
block-causal: text and condition images see only what comes before them (and their own image), the target, last,
sees everything. The target is the row-major ``h x w`` grid of ``img_shapes[0][-1]`` at the end of the sequence:
``attn`` and ``img_mlp`` merge that trailing span. Nothing before it depends on it, so the prefix -- and the K/V of
it that the pipeline caches at its first ("extract") step -- is computed exactly as unmerged; later ("cached") steps
run the target alone against that cache.

``attn`` gets per-token arguments over its input: the RoPE rows ``rotary_emb (L, D/2)`` (no batch axis: one matching,
from the batch's mean tokens, serves the batch) and the text-padding key mask ``key_valid (B, L)``, which keep the
kept target tokens' entries; a cached step's key mask ``attention_mask (B, 1, 1, prefix + T)`` spans the cached prefix
and the target (``Sublayer.key_prefix``). ``segments`` and ``cache_write_slice`` cover the prefix only: unchanged.
The flex processor's prefill mask (a ``BlockMask``, ``QwenImage21FlexAttnProcessor``) cannot be thinned: such calls
run unmerged, with a one-time warning (its cached steps merge).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from torch import Tensor, nn

from ..merging import Matching
from .calls import as_keywords, first_arg
from .merging_blocks import Sublayer, merge_block, trailing_grid
from .merging_core import TokenMergingState, observe_calls
from .merging_spans import keep_rows, merge_span

logger = logging.getLogger(__name__)


def wire_qwen21(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook ``attn`` (its RoPE rows and key masks along) and ``img_mlp`` of each block in ``blocks``; the target grid
    comes from the ``img_shapes`` and ``img_mask`` the model is called with."""
    box: dict[str, Any] = {"grid": None, "warned_flex": False}
    observe_calls(model, state, _observe, box)
    for name, blk in blocks:
        merge_block(state, name, Sublayer(blk.attn, "hidden_states", rope=_rope, key_prefix=True),
                    Sublayer(blk.img_mlp, "hidden_states"), functools.partial(trailing_grid, box), shared=True)


def target_grid(shapes: Any, slots: Any) -> tuple[int, int] | None:
    """The target ``(h, w)``: ``img_shapes[0][-1] = (1, h, w)``, where the image slots ``img_mask`` (each 2x2 latent
    tokens) end the joint sequence with at least the target's ``h * w`` tokens; else ``None`` (no merging)."""
    first = shapes[0] if isinstance(shapes, (list, tuple)) and shapes else None
    last = first[-1] if isinstance(first, (list, tuple)) and first else None
    if not isinstance(last, (list, tuple)) or len(last) != 3 or int(last[0]) != 1:
        return None
    h, w = int(last[1]), int(last[2])
    if not isinstance(slots, Tensor) or slots.dim() != 2 or slots.shape[1] == 0:
        return None
    row = slots[0].bool()
    trailing = int(row.flip(0).cumprod(0).sum())  # image slots at the end of the sequence
    return (h, w) if 4 * trailing >= h * w else None


def _observe(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    box["grid"] = target_grid(first_arg(call, "img_shapes"), first_arg(call, "img_mask"))
    if box["grid"] is not None and call.get("kv_cache_mode") != "cached" and not _plain_prefill(module):
        box["grid"] = None  # a block-causal BlockMask over the whole sequence: no thinning it
        if not box["warned_flex"]:
            box["warned_flex"] = state.warned = True  # instead of the generic "merged nothing" warning
            logger.warning("tokensparse: token merging does not merge %s calls over the whole joint sequence with a "
                           "QwenImage21FlexAttnProcessor (or another processor than QwenImage21AttnProcessor): its "
                           "block-causal BlockMask cannot be thinned with the target tokens; they run unmerged (cached "
                           "steps still merge)", type(module).__name__)
    state.observe(first_arg(call, "timestep"), call, box["grid"])


def _plain_prefill(model: nn.Module) -> bool:
    """Whether every block's attention runs a ``QwenImage21AttnProcessor`` (per-segment masks, no ``BlockMask``)."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21AttnProcessor

    return all(isinstance(getattr(blk.attn, "processor", None), QwenImage21AttnProcessor)
               for blk in getattr(model, "transformer_blocks", []))



def _rope(args: tuple, kwargs: dict, m: Matching, n: int, span: tuple[int, int]) -> tuple[tuple, dict]:
    """``attn(hidden_states, rotary_emb=(L, D/2), key_valid=(B, L), ...)``: the rows / entries of the kept target
    tokens and all others (one matching for the batch: the table has no batch axis)."""
    rope = kwargs.get("rotary_emb")
    if isinstance(rope, Tensor) and rope.shape[0] == n:
        kwargs = {**kwargs, "rotary_emb": keep_rows(rope, m, span)}
    valid = kwargs.get("key_valid")
    if isinstance(valid, Tensor) and valid.shape[-1] == n:
        kwargs = {**kwargs, "key_valid": merge_span(m, valid.expand(m.batch_size, n), span, mode="keep")}
    return args, kwargs
