"""Token merging on JoyImage Edit (``JoyImageEditTransformer3DModel``, ``JoyImageEditPipeline``; and
``JoyImageEditPlusTransformer3DModel``, ``JoyImageEditPlusPipeline``): the target's tokens in every double-stream
block.

Both run one image sequence ``[target, reference 1, ...]`` beside the text (see :mod:`.diffusers_joyimage`); the
target's row-major ``h x w`` grid comes first. Every block's ``attn`` joins ``[image, text]`` (its first output, the
image's, unmerged; the text's passes) and ``img_mlp`` runs on the image stream (the text's ``txt_mlp`` is left alone):
both merge the target span. References are never merged (Sparse Context thins them; the two stack).

- **JoyImage Edit**: ``hidden_states (B, n, C, T, H, W)`` (the items, target last; the transformer puts it first) or
  one item ``(B, C, T, H, W)``; the target is one latent frame (``T / pt == 1``) of ``H / ph x W / pw`` tokens. The
  RoPE table ``image_rotary_emb = ((cos, sin), text rows or None)``, each ``(N, D)``, has no batch axis: one matching
  (from the batch's mean tokens) serves the batch. The grid is read before Sparse Context's pre-hook, whose thinned
  call packs the kept tokens into one row.
- **JoyImage Edit Plus**: patches ``(B, N, C, pt, ph, pw)`` with ``shape_list[b] = [(t, h, w) target, references...]``;
  the RoPE table ``(cos, sin)``, each ``(B, N, D)``, has a batch axis (a matching per sample), and the key mask
  ``(B, 1, 1, N + text)`` over ``[image, text]`` (patch padding, text padding) keeps the kept tokens' entries.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from ..merging import Matching
from .calls import as_keywords, first_arg
from .merging_blocks import Sublayer, leading_grid, merge_block
from .merging_core import TokenMergingState, observe_calls
from .merging_spans import keep_rows, merge_span


def wire_joyimage(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook ``attn`` (image side, RoPE rows; Plus: the key mask) and ``img_mlp`` of each block in ``blocks``."""
    plus = hasattr(model, "_get_rotary_pos_embed_for_range")  # Edit Plus: patches and shape_list
    box: dict[str, Any] = {"grid": None}
    observe_calls(model, state, _observe_plus if plus else _observe, box, prepend=True)
    rope = _rope_plus if plus else _rope
    for name, blk in blocks:
        merge_block(state, name, Sublayer(blk.attn, "hidden_states", rope=rope, context_last=True),
                    Sublayer(blk.img_mlp, "hidden_states"), functools.partial(leading_grid, box), shared=not plus)


def _observe(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    x = call.get("hidden_states")
    pt, ph, pw = (int(p) for p in module.config.get("patch_size", (1, 2, 2)))
    box["grid"] = None
    if isinstance(x, Tensor) and x.dim() in (5, 6) and x.shape[-3] // pt == 1:  # the target: one latent frame
        box["grid"] = (x.shape[-2] // ph, x.shape[-1] // pw)
    state.observe(first_arg(call, "timestep"), call, box["grid"])


def _observe_plus(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    shapes = call.get("shape_list")
    targets = {tuple(int(v) for v in s[0]) for s in shapes} if isinstance(shapes, (list, tuple)) and shapes and all(
        isinstance(s, (list, tuple)) and s and len(s[0]) == 3 for s in shapes) else set()
    box["grid"] = None
    if len(targets) == 1:  # one target grid for the batch, one frame
        t, h, w = targets.pop()
        box["grid"] = (h, w) if t == 1 else None
    state.observe(first_arg(call, "timestep"), call, box["grid"])


def _rope(args: tuple, kwargs: dict, m: Matching, n: int, span: tuple[int, int]) -> tuple[tuple, dict]:
    """``image_rotary_emb = ((cos, sin), text rows)``, each ``(N, D)``: the kept target tokens' rows and all others
    (one matching for the batch)."""
    rope = kwargs.get("image_rotary_emb")
    if rope is None or rope[0] is None:
        return args, kwargs
    return args, {**kwargs, "image_rotary_emb": (tuple(keep_rows(t, m, span) for t in rope[0]), rope[1])}


def _rope_plus(args: tuple, kwargs: dict, m: Matching, n: int, span: tuple[int, int]) -> tuple[tuple, dict]:
    """``image_rotary_emb = (cos, sin)``, each ``(B, N, D)``: each sample's kept target tokens' rows and all others."""
    rope = kwargs.get("image_rotary_emb")
    if rope is None:
        return args, kwargs
    rows = tuple(merge_span(m, t.expand(m.batch_size, *t.shape[1:]), span, mode="keep") for t in rope)
    return args, {**kwargs, "image_rotary_emb": rows}
