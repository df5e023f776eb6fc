"""Tiny random-weight ``ErnieImagePipeline`` (text-to-image) for tests, built offline (nothing is downloaded).

Text encoder: a ``Mistral3Model`` with a 2-layer, 16-wide Mistral text model (and a 1-layer Pixtral vision tower,
which text prompts never run) over :func:`~.diffusers_tiny.tiny_qwen_tokenizer`'s byte vocabulary; the pipeline
reads its second-to-last hidden states, each prompt unpadded. No prompt enhancer (``pe``): the pipeline skips it.
VAE: a two-level ``AutoencoderKLFlux2`` (/2; the pipeline then packs 2x2 latent pixels into one token, /4 in all).
Scheduler: flow matching.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import tiny_flux2_vae, tiny_qwen_tokenizer


@needs("diffusers", "transformers")
def tiny_ernie_image(seed: int = 0, num_layers: int = 2) -> Any:
    """An ``ErnieImagePipeline`` with a tiny Mistral 3 text encoder, VAE (/4 with the pipeline's packing) and
    ERNIE-Image transformer (dim 32, patch 1; its zero-initialised modulation and output layers drawn at random).

    Height and width must be multiples of 4 (the pipeline's check): an ``H x W`` image is an ``H/4 x W/4`` grid of
    tokens (the pipeline's default, 1024, is far too big: pass them).
    """
    from diffusers import (
        ErnieImagePipeline,
        ErnieImageTransformer2DModel,
        FlowMatchEulerDiscreteScheduler,
    )
    from transformers import Mistral3Config, Mistral3Model, MistralConfig, PixtralVisionConfig

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    text_hidden = 16
    text_encoder = Mistral3Model(Mistral3Config(
        text_config=MistralConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                  max_position_embeddings=256),
        vision_config=PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, head_dim=8, image_size=32, patch_size=8),
        image_token_index=len(tokenizer) - 1)).eval()
    vae = tiny_flux2_vae()
    transformer = ErnieImageTransformer2DModel(
        hidden_size=32, num_attention_heads=2, num_layers=num_layers, ffn_hidden_size=64, in_channels=16,
        out_channels=16, patch_size=1, text_in_dim=text_hidden, rope_axes_dim=(4, 6, 6)).eval()
    # the model zero-initialises its modulation and output layers (a zero output whatever the input): random here
    for layer in (transformer.adaLN_modulation[-1], transformer.final_linear):
        torch.nn.init.normal_(layer.weight, std=0.1)
        torch.nn.init.normal_(layer.bias, std=0.1)
    return ErnieImagePipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=FlowMatchEulerDiscreteScheduler())
