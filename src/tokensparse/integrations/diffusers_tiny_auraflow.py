"""Tiny random-weight ``AuraFlowPipeline`` (text-to-image) for tests, built offline (nothing is downloaded).

Text encoder: a 1-layer ``UMT5EncoderModel`` over :func:`~.diffusers_tiny.tiny_t5_tokenizer`'s character vocabulary
(keep ``max_sequence_length`` short: the pipeline pads every prompt to it). VAE: the FLUX.1-style ``AutoencoderKL`` of
the other tiny pipelines (/2). Scheduler: flow matching.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import _tiny_flux_vae, tiny_t5_tokenizer


@needs("diffusers", "transformers")
def tiny_auraflow(seed: int = 0, num_mmdit_layers: int = 2, num_single_dit_layers: int = 2) -> Any:
    """An ``AuraFlowPipeline`` with a tiny UMT5 text encoder, VAE (/2) and AuraFlow transformer (dim 32, patch 2;
    ``num_mmdit_layers`` joint blocks, then ``num_single_dit_layers`` single blocks over ``[registers, caption,
    image]``).

    Height and width must be multiples of 4: an ``H x W`` image is an ``H/4 x W/4`` grid of tokens, at most 16 x 16
    (the positional table's size). Pass them (the pipeline's default, 1024, is far too big).
    """
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0)).eval()
    transformer = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=num_mmdit_layers,
        num_single_dit_layers=num_single_dit_layers, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=32, out_channels=4, pos_embed_max_size=256).eval()
    return AuraFlowPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_tiny_flux_vae(4),
                            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
