"""Token merging on Sana (``SanaTransformer2DModel``: ``SanaPipeline``, Sana Sprint, Sana's ControlNet and PAG
pipelines): the image tokens of every block, in its self-attention, its cross-attention and the pointwise
convolutions of its mix-FFN.

The model patchifies the latent ``(B, C, H, W)`` into a row-major ``H/p x W/p`` grid; every
``SanaTransformerBlock`` sees those tokens and nothing else (the caption enters as the cross-attention's keys, never
merged). Its self-attention ``attn1`` is linear (ReLU kernels: no softmax, no mask, no positional table): it merges
its input like any attention. The cross-attention ``attn2`` (with ``merge_cross``) merges its queries; its key mask
covers the caption only and passes as it is. The feed-forward, ``GLUMBConv``, runs on the grid as a ``(B, C, H, W)``
map: a 1x1 convolution (``conv_inverted``), a 3x3 depthwise convolution, a gate, a 1x1 convolution
(``conv_point``). The depthwise convolution mixes each token with its grid neighbours, which merged tokens no longer
have: it always runs on the whole grid. The two pointwise convolutions act on each token alone, as a linear layer
would: with ``merge_mlp`` each merges its input tokens (passed as a ``(B, C, N', 1)`` column) and unmerges its output
back onto the grid, so the depthwise convolution sees every token's (merged group's) value in place. One matching per
block serves all of them; the pointwise convolutions hold most of a block's cost (``5 d`` and ``2.5 d`` channels
out of ``d``).
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from .calls import as_keywords, first_arg
from .merging_blocks import BlockMerger, Sublayer, whole_grid
from .merging_core import TokenMergingState, latent_grid, observe_calls


def sana_sublayers(blk: nn.Module, cfg: Any) -> list[Sublayer]:
    """The sublayers of a ``SanaTransformerBlock`` that ``cfg`` merges: ``attn1`` (``merge_attn``), ``attn2``
    (``merge_cross``), the feed-forward's pointwise convolutions (``merge_mlp``), in call order."""
    subs = [Sublayer(blk.attn1, "hidden_states")] if cfg.merge_attn else []
    if cfg.merge_cross and getattr(blk, "attn2", None) is not None:
        subs.append(Sublayer(blk.attn2, "hidden_states"))
    ff = getattr(blk, "ff", None)
    if cfg.merge_mlp and ff is not None:
        # Conv2ds: peft's LoRA may replace them (their hooks follow the modules at block.ff.conv_*)
        subs += [Sublayer(getattr(ff, key), "hidden_states", channels_first=True, attr=f"ff.{key}")
                 for key in ("conv_inverted", "conv_point")]
    return subs


def wire_sana(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook the sublayers :func:`sana_sublayers` selects in each block of ``blocks``; the grid comes from the
    latent the model is called with."""
    box: dict[str, Any] = {"grid": None}
    observe_calls(model, state, _observe, box)
    for name, blk in blocks:
        subs = sana_sublayers(blk, state.cfg)
        if subs:
            BlockMerger(state, name, subs, functools.partial(whole_grid, box), block=blk)


def _observe(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    box["grid"] = latent_grid(module, call.get("hidden_states"), 1)
    state.observe(first_arg(call, "timestep"), call, box["grid"])

