"""A tiny random-weight ``VisualClozeGenerationPipeline`` (or ``VisualClozePipeline``) for tests, built offline.

Text encoders and tokenizers: the tiny CLIP + T5 ones of :func:`~.diffusers_tiny.tiny_flux_kontext`; VAE: the
FLUX.1-style one (/2); transformer: a FLUX.1 Fill-style ``FluxTransformer2DModel`` whose tokens carry
``[noisy latents, clean latents, mask]`` (16 + 16 + 16 channels).
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import _tiny_flux_vae, tiny_clip_encoder, tiny_clip_tokenizer, tiny_t5_encoder, tiny_t5_tokenizer


@needs("diffusers", "transformers")
def tiny_visualcloze(seed: int = 0, combined: bool = False, resolution: int = 32) -> Any:
    """A ``VisualClozeGenerationPipeline`` (``combined=True``: a ``VisualClozePipeline``, with its upsampling stage)
    of tiny models. Each image is resized to about ``resolution``\\ :sup:`2` pixels (multiples of 4): at 32, a
    square image is 8x8 = 64 tokens, a row of two 8x16. Call it with ``max_sequence_length=16``."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        VisualClozeGenerationPipeline,
        VisualClozePipeline,
    )

    torch.manual_seed(seed)
    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    text_encoder = tiny_clip_encoder(clip_tok)
    text_encoder_2 = tiny_t5_encoder(t5_tok)
    transformer = FluxTransformer2DModel(  # in: noisy (4 x 4) + clean (4 x 4) + mask (2 x 2 pixels x 4) channels
        patch_size=1, in_channels=48, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6)).eval()
    cls = VisualClozePipeline if combined else VisualClozeGenerationPipeline
    return cls(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=_tiny_flux_vae(4),
               text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=t5_tok,
               transformer=transformer, resolution=resolution)
