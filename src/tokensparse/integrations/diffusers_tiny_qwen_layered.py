"""A tiny random-weight ``QwenImageLayeredPipeline`` (Qwen-Image-Layered) for tests, built offline (nothing is
downloaded).

Text encoder: the one-layer, width-16 Qwen2.5-VL of :func:`~.diffusers_tiny.tiny_qwen25_vl` (the pipeline reads its
dtype even when given ``prompt_embeds``). No processor: the pipeline needs one only to caption the input image when
the prompt is empty, so call it with a prompt. VAE: an ``AutoencoderKLQwenImage`` reading RGBA pixels, like the real
one, with one spatial downsample and 8 latent channels (not 4: the pipeline takes an input of as many channels as the
VAE's latents for latents). The pipeline sizes the output and the input image from ``calculate_dimensions(640 * 640,
ratio)`` of its module, which tests shrink: 32x32 pixels give 8x8 = 64 tokens per layer and for the input image.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import tiny_qwen25_vl, tiny_qwen_vl_tokenizer


@needs("diffusers", "transformers")
def tiny_qwen_image_layered(seed: int = 0, zero_cond_t: bool = False) -> Any:
    """A ``QwenImageLayeredPipeline`` with a tiny Qwen2.5-VL text encoder, RGBA VAE and layered Qwen-Image
    transformer (``use_layer3d_rope``, ``use_additional_t_cond``; ``zero_cond_t`` as given) and no processor."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageLayeredPipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_vl_tokenizer()
    text_encoder = tiny_qwen25_vl(tokenizer)
    z_dim = 8
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False], input_channels=4,
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim).eval()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t,
        use_additional_t_cond=True, use_layer3d_rope=True).eval()
    return QwenImageLayeredPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, processor=None,
                                    transformer=transformer)
