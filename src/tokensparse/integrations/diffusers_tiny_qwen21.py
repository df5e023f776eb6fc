"""A tiny random-weight ``QwenImage21Pipeline`` (Qwen-Image 2.1) for tests, built offline (nothing is downloaded).

Text encoder: a 2-layer, width-16 Qwen3-VL (:mod:`.diffusers_tiny_vl`). VAE: an ``AutoencoderKLQwenImage21`` with
four spatial downsamples (16 pixels per latent cell, as the pipeline assumes) and 4 latent channels; it reads
RGBA pixels, like the real one. Call it with a small ``output_resolution`` (its default, 1024, sizes the output
and every condition image to about 1024^2 pixels): 128 gives 8x8 = 64 tokens per square image.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny_vl import tiny_qwen3_vl_with_processor


@needs("diffusers", "transformers")
def tiny_qwen_image21(seed: int = 0, causal_condition: bool = True) -> Any:
    """A ``QwenImage21Pipeline`` with a tiny Qwen3-VL text encoder, VAE and Qwen-Image 2.1 transformer.

    ``causal_condition=False`` gives a transformer without the prefix K/V cache (the pipeline then runs every step
    over the whole joint sequence).
    """
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )

    torch.manual_seed(seed)
    processor, text_encoder = tiny_qwen3_vl_with_processor(layers=2)
    vae = AutoencoderKLQwenImage21(
        base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False] * 4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    transformer = QwenImage21Transformer2DModel(
        in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        context_in_dim=16, axes_dims_rope=(4, 6, 6), causal_condition=causal_condition).eval()
    return QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                               text_encoder=text_encoder, processor=processor, transformer=transformer)
