"""A tiny random-weight ``OvisImagePipeline`` (text-to-image) for tests, built offline (nothing is downloaded).

Text encoder: a 2-layer ``Qwen3Model`` over :func:`~.diffusers_tiny.tiny_qwen_tokenizer`'s byte vocabulary (the
pipeline's system prompt and chat template are plain bytes to it). VAE: the FLUX.1-style ``AutoencoderKL`` of the
other tiny pipelines (/2). Transformer: one double- and one single-stream Ovis-Image block.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import _tiny_flux_vae, tiny_qwen_tokenizer


@needs("diffusers", "transformers")
def tiny_ovis_image(seed: int = 0) -> Any:
    """An ``OvisImagePipeline`` with a tiny Qwen3 text encoder, VAE and Ovis-Image transformer.

    Height and width must be multiples of 4: an ``H x W`` image is an ``H/4 x W/4`` grid of tokens (32x48: 8x12).
    ``max_sequence_length`` (default 256) text tokens follow the pipeline's 28 dropped prompt-template tokens.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=260, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024)).eval()
    transformer = OvisImageTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)).eval()
    return OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                             vae=_tiny_flux_vae(latent_channels=4), text_encoder=text_encoder,
                             tokenizer=tiny_qwen_tokenizer(), transformer=transformer)
