"""Tiny random-weight JoyImage Edit pipelines for tests, built offline (nothing is downloaded).

Text encoder and processor: a one-layer, width-16 Qwen3-VL and its ``Qwen3VLProcessor`` (:mod:`.diffusers_tiny_vl`).
VAE: a Wan 2.1-style ``AutoencoderKLWan`` with one downsample (2 pixels per latent cell), so a 32x32 image is 16x16
latent cells, 8x8 = 64 tokens after the transformer's 2x2 patches.

The pipelines snap every image to a bucket of ``diffusers.pipelines.joyimage.image_processor.BUCKETS[1024]``
(512 to 2048 pixels a side); tests swap in small buckets (:data:`SMALL_BUCKETS`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny_vl import tiny_qwen3_vl_with_processor

SMALL_BUCKETS = [(32, 32), (32, 48), (48, 32)]  # (height, width): pixel sizes for tiny tests


def _components(seed: int, plus: bool) -> dict[str, Any]:
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        JoyImageEditPlusTransformer3DModel,
        JoyImageEditTransformer3DModel,
    )

    torch.manual_seed(seed)
    processor, text_encoder = tiny_qwen3_vl_with_processor(layers=1)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_spatial=2).eval()
    cls = JoyImageEditPlusTransformer3DModel if plus else JoyImageEditTransformer3DModel
    transformer = cls(patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=16,
                      mlp_width_ratio=2.0, num_layers=2, rope_dim_list=[4, 6, 6]).eval()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": processor.tokenizer,
        "transformer": transformer,
        "processor": processor,
    }


@needs("diffusers", "transformers")
def tiny_joyimage_edit(seed: int = 0) -> Any:
    """A ``JoyImageEditPipeline`` (one reference, in the transformer's sequence after the target) with the tiny
    components above."""
    from diffusers import JoyImageEditPipeline

    return JoyImageEditPipeline(**_components(seed, plus=False))


@needs("diffusers", "transformers")
def tiny_joyimage_edit_plus(seed: int = 0) -> Any:
    """A ``JoyImageEditPlusPipeline`` (several references of any size, patchified after the target) with the tiny
    components above."""
    from diffusers import JoyImageEditPlusPipeline

    return JoyImageEditPlusPipeline(**_components(seed, plus=True))
