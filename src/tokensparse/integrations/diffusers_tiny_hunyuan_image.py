"""Tiny random-weight ``HunyuanImagePipeline`` (HunyuanImage 2.1 text-to-image) for tests, built offline (nothing is
downloaded).

Text encoders: :func:`~.diffusers_tiny.tiny_qwen25_vl` with 3 layers (the pipeline reads the third-last hidden state)
over :func:`~.diffusers_tiny.tiny_qwen_vl_tokenizer` (the pipeline pads every prompt to 1,000 tokens after its
template) and a 1-layer ByT5 ``T5EncoderModel`` (quoted text in a prompt is encoded by it as glyph text). VAE: a
two-level ``AutoencoderKLHunyuanImage`` (/2; 32 channels, its group norms' size). Scheduler: flow matching. Guidance:
``AdaptiveProjectedMixGuidance`` (two passes a step).
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import tiny_qwen25_vl, tiny_qwen_vl_tokenizer


@needs("diffusers", "transformers")
def tiny_hunyuan_image(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2) -> Any:
    """A ``HunyuanImagePipeline`` with tiny Qwen2.5-VL and ByT5 text encoders, VAE (/2) and HunyuanImage 2.1
    transformer (dim 32, patch 1; ``num_layers`` double-stream and ``num_single_layers`` single-stream blocks).

    An ``H x W`` image is an ``H/2 x W/2`` grid of tokens; pass a small size (multiples of 4; the default, 2048, is far
    too big).
    """
    from diffusers import (
        AdaptiveProjectedMixGuidance,
        AutoencoderKLHunyuanImage,
        FlowMatchEulerDiscreteScheduler,
        HunyuanImagePipeline,
        HunyuanImageTransformer2DModel,
    )
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_qwen_vl_tokenizer(), ByT5Tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0)).eval()
    transformer = HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=num_layers,
        num_single_layers=num_single_layers, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16,
        text_embed_2_dim=16, rope_axes_dim=(8, 8)).eval()
    vae = AutoencoderKLHunyuanImage(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        spatial_compression_ratio=2, sample_size=32, scaling_factor=0.5).eval()
    return HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=tiny_qwen25_vl(tokenizer, layers=3),
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
        guider=AdaptiveProjectedMixGuidance(guidance_scale=3.5))
