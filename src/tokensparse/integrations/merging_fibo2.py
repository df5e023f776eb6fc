"""Token merging on Fibo 2.0 (``BriaFibo2Transformer2DModel``, ``BriaFibo2Pipeline``): the target (generated image)
tokens in every block, never the gist (text) tokens or the images to edit.

The model patchifies the target ``hidden_states (B, C, H, W)`` into a row-major ``H/p x W/p`` grid and the images to
edit (``context_latents``) after it. Its blocks (``BriaFibo2TransformerBlock``, Z-Image's) come in two groups:

- the ``noise_refiner`` blocks see ``[target, images to edit]``: the target grid leads;
- the main ``layers`` see one stream with the gist tokens (the Perceiver's summary of the prompt) added: ``[gist,
  target, images to edit]``, or, when a batch's prompts get different gist counts, ``[target, images to edit, gist]``
  with a key mask ``(B, L)`` over it hiding each prompt's padding gist tokens. Where the target starts is read from
  the Perceiver's call (its ``num_gist_tokens`` and whether it got that padding mask), the model's own numbers.

In each block the self-attention ``attention`` merges the target span (its RoPE rows ``freqs_cis (1, L, D/2)`` and
the key mask along), the injection blocks' ``cross_attention`` its queries (``merge_cross``; its keys are the prompt's,
its mask over them passes as it is) and ``feed_forward`` the target span. The per-token modulation (noisy target,
clean gist and images) is applied outside those sublayers, on every token. The RoPE table is expanded to the batch:
each sample gets its own matching, as in Z-Image. Sparse Context, which thins the images to edit where the sequence
is made, stacks: the target stays whole and in place.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from torch import Tensor, nn

from ..merging import Matching
from .calls import as_keywords, first_arg
from .merging_blocks import BlockMerger, Sublayer, leading_grid
from .merging_core import TokenMergingState, latent_grid, observe_calls
from .merging_spans import merge_span

_REFINER = re.compile(r"(^|\.)noise_refiner\.\d+$")  # blocks over [target, images to edit]: no gist tokens


def fibo2_sublayers(blk: nn.Module, cfg: Any) -> list[Sublayer]:
    """The sublayers of a ``BriaFibo2TransformerBlock`` that ``cfg`` merges, in call order: ``attention``
    (``merge_attn``; RoPE rows and key mask along), ``cross_attention`` (``merge_cross``, injection blocks only; its
    queries), ``feed_forward`` (``merge_mlp``)."""
    subs = [Sublayer(blk.attention, "hidden_states", rope=_rope)] if cfg.merge_attn else []
    if cfg.merge_cross and getattr(blk, "cross_attention", None) is not None:
        subs.append(Sublayer(blk.cross_attention, "hidden_states"))
    if cfg.merge_mlp:
        subs.append(Sublayer(blk.feed_forward, "x"))
    return subs


def wire_fibo2(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook the sublayers :func:`fibo2_sublayers` selects in each block of ``blocks``; the grid comes from the latent
    the model is called with, the target's start in the main layers from the Perceiver's call."""
    box: dict[str, Any] = {"grid": None, "start": None}
    observe_calls(model, state, _observe, box)
    perceiver = getattr(model, "perceiver", None)
    if isinstance(perceiver, nn.Module):
        state.handles.append(perceiver.register_forward_pre_hook(functools.partial(_observe_gist, box),
                                                                 with_kwargs=True))
    for name, blk in blocks:
        subs = fibo2_sublayers(blk, state.cfg)
        if subs:
            grid = leading_grid if _REFINER.search(name) else gist_grid
            BlockMerger(state, name, subs, functools.partial(grid, box))


def gist_grid(box: dict, n: int) -> tuple[int, int, int] | None:
    """A grid function for the main layers: the target grid ``box["grid"] = (h, w)`` from ``box["start"]`` (after the
    gist tokens, or first when they go last), ``None`` (nothing merged) when either is unknown or it overruns the
    ``n`` tokens."""
    g, start = box["grid"], box["start"]
    return None if g is None or start is None or start + g[0] * g[1] > n else (g[0], g[1], start)


def _observe(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    box["grid"], box["start"] = latent_grid(module, call.get("hidden_states")), None
    state.observe(first_arg(call, "timestep"), call, box["grid"])


def _observe_gist(box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Pre-hook on the Perceiver, ``perceiver(text, num_gist_tokens, text_mask, gist_mask)``: the main layers' stream
    is ``[gist, target, ...]``, or ``[target, ..., gist]`` when a gist padding mask is given."""
    call = as_keywords(module, args, kwargs)
    count = call.get("num_gist_tokens")
    box["start"] = None if count is None else 0 if call.get("attention_mask") is not None else int(count)


def _rope(args: tuple, kwargs: dict, m: Matching, n: int, span: tuple[int, int]) -> tuple[tuple, dict]:
    """``attention(tokens, attention_mask=..., freqs_cis=(1, L, D/2))``: each sample's kept target tokens keep their
    own rows, every other row stays (the key mask is thinned by the block merger)."""
    freqs = kwargs.get("freqs_cis")
    if not isinstance(freqs, Tensor):
        return args, kwargs
    return args, {**kwargs, "freqs_cis": merge_span(m, freqs.expand(m.batch_size, *freqs.shape[1:]), span,
                                                    mode="keep")}
