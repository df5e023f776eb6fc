"""Tiny random-weight ``SanaPipeline`` (text-to-image) for tests, built offline (nothing is downloaded).

Text encoder: a 2-layer ``Gemma2Model`` over :func:`~.diffusers_tiny.tiny_qwen_tokenizer`'s byte vocabulary (the
pipeline's default ``complex_human_instruction`` is about 1,000 bytes long: its positions reach 2048). VAE: a
two-level ``AutoencoderDC`` (/2). Scheduler: Sana's flow-matching DPM-Solver++.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import tiny_qwen_tokenizer


def _tiny_dc_ae(latent_channels: int = 4) -> Any:
    """An ``AutoencoderDC`` with two levels (/2 spatially), 8 and 16 channels."""
    from diffusers import AutoencoderDC

    return AutoencoderDC(
        in_channels=3, latent_channels=latent_channels, attention_head_dim=4,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.5).eval()


@needs("diffusers", "transformers")
def tiny_sana(seed: int = 0, num_layers: int = 2) -> Any:
    """A ``SanaPipeline`` with a tiny Gemma 2 text encoder, VAE (/2) and Sana transformer (dim 32, patch 1, as Sana's).

    An ``H x W`` image is an ``H/2 x W/2`` grid of tokens. Call it with ``use_resolution_binning=False`` and a small
    ``height`` / ``width`` (multiples of 2): the pipeline's bins (and its default, 1024) are far too big here.
    """
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    text_hidden = 16
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=260, hidden_size=text_hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=2048, sliding_window=2048)).eval()
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=num_layers,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=text_hidden,
        mlp_ratio=2.5, sample_size=16, patch_size=1).eval()
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return SanaPipeline(tokenizer=tiny_qwen_tokenizer(), text_encoder=text_encoder, vae=_tiny_dc_ae(),
                        transformer=transformer, scheduler=scheduler)
