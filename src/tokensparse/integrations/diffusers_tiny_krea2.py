"""Tiny random-weight ``Krea2Pipeline`` (text-to-image) for tests, built offline (nothing is downloaded).

Text encoder: the ``Qwen3VLModel`` inside :func:`~.diffusers_tiny_vl.tiny_qwen3_vl` (two text layers of width 16,
both tapped: ``text_encoder_select_layers=(1, 2)``), with its processor's tokenizer. VAE: the Qwen-Image
``AutoencoderKLQwenImage`` of the other tiny Qwen pipelines (/2, then the pipeline's 2x2 packing: /4 in all).
Scheduler: flow matching.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny_vl import tiny_qwen3_vl_with_processor


@needs("diffusers", "transformers")
def tiny_krea2(seed: int = 0, num_layers: int = 2) -> Any:
    """A ``Krea2Pipeline`` with a tiny Qwen3-VL text encoder, VAE (/4 with the pipeline's packing) and Krea 2
    transformer (dim 32, 2 heads, one text-fusion block of each kind).

    Height and width must be multiples of 4: an ``H x W`` image is an ``H/4 x W/4`` grid of tokens (the pipeline's
    default, 1024, is far too big: pass them). The byte tokenizer makes the pipeline's template prefix 180 tokens, of
    which it drops 34: with a ``max_sequence_length`` under about 150 plus the prompt's bytes (default 512) the prompt
    is cut off, and every prompt (the empty negative one too) becomes the same text.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        Krea2Pipeline,
        Krea2Transformer2DModel,
    )

    torch.manual_seed(seed)
    processor, text_encoder = tiny_qwen3_vl_with_processor(layers=2)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    transformer = Krea2Transformer2DModel(
        in_channels=16, num_layers=num_layers, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=2,
        text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=32,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6)).eval()
    return Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder.model.eval(),
                         tokenizer=processor.tokenizer, transformer=transformer, text_encoder_select_layers=(1, 2))
