"""Tiny random-weight ``Lumina2Pipeline`` (text-to-image) for tests, built offline (nothing is downloaded).

Text encoder: a 2-layer ``Gemma2Model`` over :func:`~.diffusers_tiny.tiny_qwen_tokenizer`'s byte vocabulary (the
pipeline prepends its system prompt, about 170 bytes: keep ``max_sequence_length`` at 256, its default). VAE: an
``AutoencoderKL`` that downsamples 8 times, as ``Lumina2Pipeline`` assumes (its ``vae_scale_factor`` is fixed).
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import tiny_qwen_tokenizer


def _tiny_vae8(latent_channels: int = 4) -> Any:
    """An ``AutoencoderKL`` with four levels (/8 spatially), 8 to 16 channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=latent_channels,
                         norm_num_groups=4, sample_size=64, shift_factor=0.1, scaling_factor=0.5).eval()


@needs("diffusers", "transformers")
def tiny_lumina2(seed: int = 0, num_layers: int = 2) -> Any:
    """A ``Lumina2Pipeline`` with a tiny Gemma 2 text encoder, VAE (/8) and Lumina 2 transformer (dim 32, patch 2).

    Height and width must be multiples of 16: an ``H x W`` image is an ``H/16 x W/16`` grid of tokens (the pipeline's
    default, 1024, is far too big: pass them).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    text_hidden = 16
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=260, hidden_size=text_hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512, sliding_window=512)).eval()
    transformer = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=num_layers, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(300, 64, 64),
        cap_feat_dim=text_hidden).eval()
    return Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                           vae=_tiny_vae8(), text_encoder=text_encoder, tokenizer=tiny_qwen_tokenizer())
