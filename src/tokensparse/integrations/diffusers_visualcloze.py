"""VisualCloze (``VisualClozeGenerationPipeline``, and ``VisualClozePipeline`` through it): its in-context example rows,
thinned.

The pipeline takes a grid of images: rows of in-context examples, then the query row whose targets are ``None``.
Each row's images are resized to one height, put side by side into one image, VAE-encoded and packed into 2x2
patches; the rows' tokens are concatenated into one sequence, all of it noised and denoised (a FLUX.1 Fill
transformer, ``FluxTransformer2DModel``: ``hidden_states`` holds ``[noisy latents, clean latents, mask]`` per token,
the mask 1 on the target cells), with FLUX ids ``img_ids (N, 3) = (row, h, w)``, rows numbered from 1. Only the
query row is decoded. So every example row is a token group of its own: a reference here; the query row, which
holds the target (and the query's condition images), is kept whole.

A dropped example token is out of the call and its prediction is zero, so the scheduler leaves its latent where it
is; example rows are never decoded. Registered in :mod:`.diffusers_models` for the two pipelines (their transformer
class is FLUX.1's, whose other pipelines number the target 0); the bare transformer's adapter reads a call whose ids
number no token 0 with it (``FluxAdapter``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .diffusers_layout import InContextAdapter, RefLayout, grid_layout


class VisualClozeAdapter(InContextAdapter):
    """VisualCloze: the references are the rows before the last (``img_ids`` first coordinate below its largest);
    the kept tokens keep their ids. The selection reads each token's clean latent (:meth:`tokens`), which stays the
    same over a generation while the noisy part is denoised."""

    out_channels = 0  # the transformer's: the width of the noisy latents, first in each token
    warns_without_references = False  # VisualClozePipeline's upsampling stage runs the transformer without examples

    def attach(self, transformer: torch.nn.Module, state: Any) -> list[Any]:
        """Remember the transformer's output channels (no companion hook)."""
        self.out_channels = int(getattr(transformer, "out_channels", 0) or 0)
        return []

    def tokens(self, kwargs: dict[str, Any]) -> Tensor:
        """Each token's clean latent ``(B, N, C)``: the channels after the noisy ones (all of them when there are
        no condition channels)."""
        hs, c = kwargs["hidden_states"], self.out_channels
        return hs[..., c:2 * c] if c and hs.shape[-1] >= 2 * c else hs

    @staticmethod
    def _ids(kwargs: dict[str, Any]) -> Tensor | None:
        ids = kwargs.get("img_ids")
        return ids[0] if ids is not None and ids.dim() == 3 else ids

    def layout(self, kwargs: dict[str, Any]) -> RefLayout | None:
        ids = self._ids(kwargs)
        if ids is None:
            return None
        layout = grid_layout(ids, int(ids[:, 0].max()))  # the last row (the query, with the target) stays whole
        if layout is not None and kwargs["hidden_states"].shape[1] != layout.n:
            raise ValueError(f"hidden_states has {kwargs['hidden_states'].shape[1]} tokens but img_ids has {layout.n}")
        return layout

    def subset(self, kwargs: dict[str, Any], index: Tensor, layout: RefLayout, state: Any) -> dict[str, Any]:
        ids = kwargs["img_ids"]
        return {**kwargs, "hidden_states": kwargs["hidden_states"].index_select(1, index),
                "img_ids": ids.index_select(-2, index.to(ids.device))}

    def call_inputs(self, state: Any, kwargs: dict[str, Any]) -> tuple[list | None, list | None, bool]:
        """The pipeline captured the first sample's images row by row (``prepare_latents``); each example row's are
        put side by side, as the pipeline encodes them: one reference each. The prompt: the task prompt."""
        ids = self._ids(kwargs)
        rows = int(torch.unique(ids[:, 0]).numel()) if ids is not None else 0
        images = state.images if state.images and state.images_tick == state.forwards else None
        pixels = None
        if images and rows and len(images) % rows == 0 and all(x is not None for x in images):
            n = len(images) // rows
            pixels = [torch.cat(images[r * n:(r + 1) * n], dim=-1) for r in range(rows - 1)]
        prompts = state.prompts[:1] if state.prompts and state.prompts_tick == state.forwards else None
        return pixels, prompts, state.forwards in (state.images_tick, state.prompts_tick)
