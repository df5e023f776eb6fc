"""Token merging on Lumina 2 (``Lumina2Transformer2DModel``, ``Lumina2Pipeline``): its image grid in the noise refiner
and the joint layers; the caption (and the context refiner, which sees only the caption) is left alone.

The model patchifies the latent ``(B, C, H, W)`` into a row-major ``H/p x W/p`` grid. The noise refiner's blocks see
the image tokens alone (RoPE ``(B, N, D/2)``, no mask). The joint ``layers`` see per sample ``[caption (its
unpadded length c_i), image (N), padding]``, padded to the longest sample (a key mask ``(B, L)`` then hides the
padding), with a per-sample RoPE table ``(B, L, D/2)``: the image starts at ``c_i``, which differs between prompts
of different lengths. Where it does, each joint block sees its tokens reordered to ``[image, caption, padding]``
(mask and RoPE rows along; attention and the feed-forward treat tokens alike, whatever their order) and its output
put back in place, so that the image grid is one span for the batch. Attention passes its tokens again as
``encoder_hidden_states`` (its keys): they merge with it. Each sample gets its own matching (the RoPE table has a
batch axis), and each kept token its own RoPE row. Lumina's timestep rises over a generation (``1 - t/1000``):
steps are counted from ``1 - timestep``.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import Tensor, nn

from ..merging import Matching
from .calls import as_keywords, first_arg
from .merging_blocks import Sublayer, merge_block
from .merging_core import TokenMergingState, observe_calls
from .merging_spans import merge_span

_JOINT = re.compile(r"(^|\.)layers\.\d+$")
_IMAGE_BLOCKS = re.compile(r"(^|\.)(layers|noise_refiner)\.\d+$")  # the context refiner sees the caption only


def image_blocks(blocks: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The Lumina 2 blocks that see image tokens: the joint ``layers`` and the ``noise_refiner``."""
    return [(n, m) for n, m in blocks if _IMAGE_BLOCKS.search(n)]


def wire_lumina2(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook ``attn`` (with its RoPE rows, keys and key mask) and ``feed_forward`` of each block in ``blocks``."""
    box: dict[str, Any] = {"grid": None, "start": 0, "order": None}
    observe_calls(model, state, _observe, box)
    for name, blk in blocks:
        joint = bool(_JOINT.search(name))
        merger = merge_block(state, name, Sublayer(blk.attn, "hidden_states", rope=_rope, self_context=True),
                             Sublayer(blk.feed_forward, "x"), functools.partial(_grid, box, joint))
        if merger is not None and joint:  # block hooks: they run around all of the sublayers' hooks
            state.handles.append(blk.register_forward_pre_hook(functools.partial(_reorder, box), with_kwargs=True))
            state.handles.append(blk.register_forward_hook(_restore))


def _observe(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    x, mask = call.get("hidden_states"), call.get("encoder_attention_mask")
    box.update(grid=None, start=0, order=None)
    if isinstance(x, Tensor) and x.dim() == 4 and isinstance(mask, Tensor) and mask.dim() == 2:
        p = int(module.config.get("patch_size", 2))
        h, w = x.shape[-2] // p, x.shape[-1] // p
        caps = mask.sum(1).tolist()  # the model's own caption lengths (its tokens come first, then the image)
        box["grid"] = (h, w)
        if len(set(caps)) == 1:
            box["start"] = int(caps[0])
        else:
            box["order"] = image_first(caps, h * w, x.device)
    t = first_arg(call, "timestep")
    state.observe(1.0 - t if t is not None else None, call, box["grid"])  # Lumina's t rises (1 - t/1000)


def image_first(caps: list[int], n: int, device: torch.device) -> Tensor:
    """Per sample, the order ``(B, L)`` that takes ``[caption (c_i), image (n), padding]`` to ``[image, caption,
    padding]`` (``L = max c_i + n``)."""
    total = max(caps) + n
    ar = torch.arange(total, device=device)
    rows = []
    for c in caps:
        c = int(c)
        rows.append(torch.cat([ar[c:c + n], ar[:c], ar[c + n:]]))
    return torch.stack(rows)


def _take(x: Tensor, order: Tensor) -> Tensor:
    """``x[b, order[b]]`` for each sample (any dtype: the RoPE table is complex)."""
    x = x.expand(order.shape[0], *x.shape[1:])
    return x[torch.arange(order.shape[0], device=order.device)[:, None], order]


def _reorder(box: dict, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    module.__dict__.pop("_tokensparse_order", None)
    order = box["order"]
    call = as_keywords(module, args, kwargs)
    x = call.get("hidden_states")
    if order is None or not isinstance(x, Tensor) or x.shape[:2] != order.shape:
        return None
    order = order.to(x.device)
    for key in ("hidden_states", "attention_mask", "image_rotary_emb"):
        if isinstance(call.get(key), Tensor):
            call[key] = _take(call[key], order)
    module.__dict__["_tokensparse_order"] = torch.argsort(order, dim=1)
    return (), call


def _restore(module: nn.Module, args: tuple, output: Any) -> Any:
    inverse = module.__dict__.pop("_tokensparse_order", None)
    return None if inverse is None else _take(output, inverse)


def _grid(box: dict, joint: bool, n: int) -> tuple[int, int, int] | None:
    """The image grid among a sublayer's ``n`` tokens: first in the noise refiner and in reordered joint blocks,
    after the caption in joint blocks whose samples have captions of one length."""
    g = box["grid"]
    start = box["start"] if joint and box["order"] is None else 0
    return None if g is None or start + g[0] * g[1] > n else (g[0], g[1], start)


def _rope(args: tuple, kwargs: dict, m: Matching, n: int, span: tuple[int, int]) -> tuple[tuple, dict]:
    """``image_rotary_emb (B, n, D/2)``: each kept image token keeps its own row; the others all stay."""
    freqs = kwargs.get("image_rotary_emb")
    if not isinstance(freqs, Tensor):
        return args, kwargs
    return args, {**kwargs, "image_rotary_emb": merge_span(m, freqs.expand(m.batch_size, *freqs.shape[1:]), span,
                                                           mode="keep")}
