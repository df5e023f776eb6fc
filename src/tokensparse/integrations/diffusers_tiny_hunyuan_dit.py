"""Tiny random-weight ``HunyuanDiTPipeline`` (text-to-image) for tests, built offline (nothing is downloaded).

Text encoders: a 1-layer ``BertModel`` over :func:`~.diffusers_tiny.tiny_clip_tokenizer`'s character vocabulary (the
pipeline pads it to 77 tokens) and :func:`~.diffusers_tiny.tiny_t5_encoder` (padded to 256). VAE: an ``AutoencoderKL``
that downsamples 8 times, as ``HunyuanDiTPipeline`` assumes (its RoPE grid is ``height // 8 // patch_size``).
Scheduler: DDPM (v-prediction, as HunyuanDiT's). No safety checker.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import tiny_clip_tokenizer, tiny_t5_encoder, tiny_t5_tokenizer
from .diffusers_tiny_lumina2 import _tiny_vae8


@needs("diffusers", "transformers")
def tiny_hunyuan_dit(seed: int = 0, num_layers: int = 4) -> Any:
    """A ``HunyuanDiTPipeline`` with tiny BERT and T5 text encoders, VAE (/8) and HunyuanDiT transformer (dim 32,
    patch 2; ``num_layers`` blocks, the second half fed the first half's long skips).

    Height and width must be multiples of 16: an ``H x W`` image is an ``H/16 x W/16`` grid of tokens. Call it with
    ``use_resolution_binning=False`` and a small size (the pipeline's default, 1024, is far too big).
    """
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    text_encoder = BertModel(BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=80), add_pooling_layer=False).eval()
    transformer = HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2, sample_size=8, hidden_size=32,
        num_layers=num_layers, cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=16,
        text_len=77, text_len_t5=256).eval()
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.03,
                              prediction_type="v_prediction", steps_offset=1, clip_sample=False)
    return HunyuanDiTPipeline(vae=_tiny_vae8(), text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              scheduler=scheduler, safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=tiny_t5_encoder(tokenizer_2),
                              tokenizer_2=tokenizer_2)
