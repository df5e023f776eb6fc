"""A tiny random-weight ``ChromaPipeline`` (text-to-image) for tests, built offline (nothing is downloaded).

Text encoder: a 1-layer ``T5EncoderModel`` over :func:`~.diffusers_tiny.tiny_t5_tokenizer`'s characters. VAE: the
FLUX.1-style ``AutoencoderKL`` of the other tiny pipelines (/2). Transformer: one double- and two single-stream
Chroma blocks, with a small modulation approximator.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import _tiny_flux_vae, tiny_t5_encoder, tiny_t5_tokenizer


@needs("diffusers", "transformers")
def tiny_chroma(seed: int = 0) -> Any:
    """A ``ChromaPipeline`` with a tiny T5 text encoder, VAE and Chroma transformer.

    Height and width must be multiples of 4: an ``H x W`` image is an ``H/4 x W/4`` grid of tokens (32x48: 8x12).
    Pass ``max_sequence_length`` (e.g. 32) to keep the text short; the pipeline's default is 512 tokens.
    """
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = tiny_t5_encoder(tokenizer)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=1).eval()
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                          vae=_tiny_flux_vae(latent_channels=4), text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
