"""A tiny random-weight ``BriaPipeline`` (Bria 3.x text-to-image) for tests, built offline (nothing is downloaded).

Text encoder: a 1-layer ``T5EncoderModel`` over :func:`~.diffusers_tiny.tiny_t5_tokenizer`'s characters. VAE: the
FLUX.1-style ``AutoencoderKL`` of the other tiny pipelines (/2). Transformer: one double- and one single-stream
Bria block. (``diffusers_tiny_bria`` builds the other Bria pipeline, FIBO Edit.)
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import _tiny_flux_vae, tiny_t5_encoder, tiny_t5_tokenizer


@needs("diffusers", "transformers")
def tiny_bria(seed: int = 0) -> Any:
    """A ``BriaPipeline`` with a tiny T5 text encoder, VAE and Bria transformer.

    Height and width must be multiples of 4: an ``H x W`` image is an ``H/4 x W/4`` grid of tokens (32x48: 8x12).
    Pass ``max_sequence_length`` (e.g. 16) to keep the text short; the pipeline's default is 128 tokens.
    """
    from diffusers import BriaPipeline, BriaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = tiny_t5_encoder(tokenizer)
    transformer = BriaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=[4, 6, 6]).eval()
    return BriaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                        vae=_tiny_flux_vae(latent_channels=4), text_encoder=text_encoder, tokenizer=tokenizer)
