"""Token merging on AuraFlow (``AuraFlowTransformer2DModel``, ``AuraFlowPipeline``): the image tokens in every block.

The model patchifies the latent ``(B, C, H, W)`` into a row-major ``H/p x W/p`` grid and adds its learned positional
table there, once: the blocks take no positional table. Its joint blocks (``AuraFlowJointTransformerBlock``, as SD3's)
keep the image and the text (register tokens, then the caption) apart: ``attn`` joins them (its first output, the
image's, unmerged; the text's passes) and ``ff`` runs on the image alone; the text's ``ff_context`` is left alone. Its
single blocks (``AuraFlowSingleTransformerBlock``) run ``[registers, caption, image]`` as one sequence: the image is
the span after the text (as long as the registers and the model call's caption), merged in ``attn`` and ``ff``. No
attention mask is passed, and nothing ties the samples of a batch: each gets its own matching.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from .calls import as_keywords, first_arg
from .merging_blocks import Sublayer, merge_block
from .merging_core import TokenMergingState, observe_calls


def wire_auraflow(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook ``attn`` (a joint block's: its image side) and ``ff`` of each joint and single block in ``blocks`` (a joint
    block is one with an ``ff_context``)."""
    box: dict[str, Any] = {"grid": None, "n_txt": None}
    observe_calls(model, state, _observe, box)
    for name, blk in blocks:
        single = getattr(blk, "ff_context", None) is None
        merge_block(state, name, Sublayer(blk.attn, "hidden_states"), Sublayer(blk.ff, "x"),
                    functools.partial(_grid, box, single))


def _observe(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = as_keywords(module, args, kwargs)
    x, txt = call.get("hidden_states"), call.get("encoder_hidden_states")
    registers = getattr(module, "register_tokens", None)
    box.update(grid=None, n_txt=None)
    if isinstance(x, Tensor) and x.dim() == 4:
        p = int(module.config.get("patch_size", 2) or 1)
        box["grid"] = (x.shape[-2] // p, x.shape[-1] // p)
    if isinstance(txt, Tensor) and txt.dim() == 3:
        box["n_txt"] = txt.shape[1] + (registers.shape[1] if isinstance(registers, Tensor) else 0)
    state.observe(first_arg(call, "timestep"), call, box["grid"])


def _grid(box: dict, single: bool, n: int) -> tuple[int, int, int] | None:
    """The image grid among a sublayer's ``n`` tokens: all of them (a joint block's image stream), or the span after
    the text (a single block: ``[registers, caption, image]``)."""
    g, start = box["grid"], box["n_txt"] if single else 0
    if g is None or start is None or start + g[0] * g[1] != n:
        return None
    return g[0], g[1], start
