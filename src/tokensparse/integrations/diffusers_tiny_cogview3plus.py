"""Tiny random-weight ``CogView3PlusPipeline`` (text-to-image) for tests, built offline (nothing is downloaded).

Text encoder: :func:`~.diffusers_tiny.tiny_t5_encoder` over :func:`~.diffusers_tiny.tiny_t5_tokenizer` (pass a short
``max_sequence_length``, e.g. 16: every prompt is padded to it). VAE: the FLUX.1-style ``AutoencoderKL`` of the other
tiny pipelines (/2). Scheduler: CogView3-Plus's ``CogVideoXDDIMScheduler`` (v-prediction, trailing timesteps).
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import _tiny_flux_vae, tiny_t5_encoder, tiny_t5_tokenizer


@needs("diffusers", "transformers")
def tiny_cogview3plus(seed: int = 0, num_layers: int = 2) -> Any:
    """A ``CogView3PlusPipeline`` with a tiny T5 text encoder, VAE (/2) and CogView3-Plus transformer (dim 32, patch 2).

    Height and width must be multiples of 8 (the pipeline's check): an ``H x W`` image is an ``H/4 x W/4`` grid of
    tokens (the pipeline's default, 256 latent pixels' worth, is far too big: pass them).
    """
    from diffusers import CogVideoXDDIMScheduler, CogView3PlusPipeline, CogView3PlusTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    transformer = CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, text_embed_dim=16, time_embed_dim=16, condition_dim=8, pos_embed_max_size=32,
        sample_size=16).eval()
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, prediction_type="v_prediction",
                                       rescale_betas_zero_snr=True, set_alpha_to_one=True, timestep_spacing="trailing")
    return CogView3PlusPipeline(tokenizer=tokenizer, text_encoder=tiny_t5_encoder(tokenizer), vae=_tiny_flux_vae(4),
                                transformer=transformer, scheduler=scheduler)
