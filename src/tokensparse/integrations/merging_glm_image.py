"""Token merging on GLM-Image (``GlmImageTransformer2DModel``, ``GlmImagePipeline``): the target's image stream in every
block, never the condition images.

``GlmImageTransformerBlock`` is CogView4's block: two streams, the image tokens (a row-major ``H/p x W/p`` grid of the
latent ``(B, C, H, W)``, nothing else) and the text (glyph) tokens; ``attn1`` joins them as ``[text, image]`` with a
RoPE table ``(cos, sin)``, each ``(N, D)`` with no batch axis (one matching, from the batch's mean tokens, serves the
batch), and ``ff`` runs on the image stream, then on the text stream (only that first call merges). So CogView4's
wiring serves it (:mod:`.merging_cogview4`), with one difference: the condition images.

``GlmImagePipeline`` calls the transformer once per condition image before the denoising loop, in the K/V cache's
"write" mode (``kv_caches``): that image's latent alone, whose keys and values every conditional denoising call
("read" mode) puts before its own. Those calls are references: they run unmerged (Sparse Context thins them, and the
two stack), and they are no step of the generation (their timestep is a placeholder 0): the step tracker does not see
them. A denoising call merges its target whatever the cache mode; the cached keys it reads are the condition images'
whole (or thinned) tokens.
"""

from __future__ import annotations

from torch import nn

from .calls import as_keywords
from .merging_cogview4 import _observe as _observe_cogview4
from .merging_cogview4 import wire_cogview4
from .merging_core import TokenMergingState


def wire_glm_image(model: nn.Module, blocks: list[tuple[str, nn.Module]], state: TokenMergingState) -> None:
    """Hook ``attn1`` (image stream, its RoPE rows) and ``ff`` (its image-stream call) of each block, as CogView4's;
    K/V-cache write calls (the condition images) run unmerged."""
    wire_cogview4(model, blocks, state, _observe)


def writes_cache(call: dict) -> bool:
    """Whether a ``GlmImageTransformer2DModel`` call (its arguments by name) writes a condition image's K/V: its
    ``kv_caches`` in "write" mode."""
    caches = call.get("kv_caches")
    return caches is not None and bool(getattr(caches, "num_layers", 0)) and caches[0].mode == "write"


def _observe(state: TokenMergingState, box: dict, module: nn.Module, args: tuple, kwargs: dict) -> None:
    if writes_cache(as_keywords(module, args, kwargs)):
        box["grid"] = None
        state.grids_found = 1  # a reference by design, not the silent no-op the "merged nothing" warning is about
        return
    _observe_cogview4(state, box, module, args, kwargs)
