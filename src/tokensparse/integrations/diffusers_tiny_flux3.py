"""A tiny random-weight FLUX.3 denoiser for tests, built offline (nothing is downloaded).

Diffusers ships FLUX.3 as modular blocks only; the one built here is the image-conditioned core denoise step
(``Flux3ImageConditionedCoreDenoiseStep``: inputs, latents, reference tokens and ids, timesteps, the denoising loop
with classifier-free guidance), which takes prompt embeddings and packed reference latents instead of text and
pixels, so no text encoder, prompt upsampler or VAE is needed.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs

CHANNELS = 16  # packed latent channels of the target and of the references


@needs("diffusers", "transformers")
def tiny_flux3_denoise(seed: int = 0) -> Any:
    """A modular ``Flux3ImageConditionedCoreDenoiseStep`` pipeline with a tiny ``Flux3Transformer2DModel`` (one
    per-mode and one single block, width 32) and a default ``ClassifierFreeGuidance`` guider (two transformer calls
    per step). An ``H x W`` image is an ``H/16 x W/16`` grid of target tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux3Transformer2DModel
    from diffusers.modular_pipelines.flux3.modular_blocks_flux3 import Flux3ImageConditionedCoreDenoiseStep

    torch.manual_seed(seed)
    transformer = Flux3Transformer2DModel(
        in_channels=CHANNELS, cond_in_channels=CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, timestep_channels=16, axes_dims_rope=(4, 4, 4, 4)).eval()
    pipe = Flux3ImageConditionedCoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux3_call_kwargs(grids: list[tuple[int, int]], size: int = 64, steps: int = 2, seed: int = 0) -> dict[str, Any]:
    """Arguments for :func:`tiny_flux3_denoise`'s pipeline: random prompt embeddings (and negative ones, for its
    guider) and one ``(1, 16, h, w)`` packed latent per reference grid, drawn from ``seed``; a ``size`` square."""
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(1, 5, 16, generator=g),
        "negative_prompt_embeds": torch.randn(1, 3, 16, generator=g),
        "image_cond_latents": [torch.randn(1, CHANNELS, h, w, generator=g) for h, w in grids],
        "height": size, "width": size, "num_inference_steps": steps,
        "generator": torch.Generator().manual_seed(seed + 1),
    }
