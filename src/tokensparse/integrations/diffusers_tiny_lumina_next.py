"""Tiny random-weight ``LuminaPipeline`` (Lumina-Next, text-to-image) for tests, built offline (nothing is downloaded).

Text encoder: a 2-layer ``GemmaModel`` over :func:`~.diffusers_tiny.tiny_qwen_tokenizer`'s byte vocabulary, which
here, like Gemma's tokenizer, starts every prompt with a special token (an empty negative prompt would otherwise be
all padding: a caption of no visible key, NaN in the cross-attention); the pipeline reads its second-to-last hidden
states. VAE: the ``AutoencoderKL`` of :mod:`.diffusers_tiny_lumina2`, which
downsamples 8 times, as ``LuminaPipeline`` assumes (its ``vae_scale_factor`` is fixed). Scheduler: flow matching.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import tiny_qwen_tokenizer
from .diffusers_tiny_lumina2 import _tiny_vae8


def _tiny_gemma_tokenizer() -> Any:
    """:func:`~.diffusers_tiny.tiny_qwen_tokenizer`, prefixing ``<|im_start|>`` (a BOS) to each text."""
    from tokenizers.processors import TemplateProcessing

    tok = tiny_qwen_tokenizer()
    start = "<|im_start|>"
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{start} $A", pair=f"{start} $A $B", special_tokens=[(start, tok.convert_tokens_to_ids(start))])
    return tok


@needs("diffusers", "transformers")
def tiny_lumina_next(seed: int = 0, num_layers: int = 2) -> Any:
    """A ``LuminaPipeline`` with a tiny Gemma text encoder, VAE (/8) and Lumina-Next transformer (dim 32, 2 heads,
    patch 2; its zero-initialised cross-attention gates drawn at random, its unused pad token zero).

    Height and width must be multiples of 16: an ``H x W`` image is an ``H/16 x W/16`` grid of tokens (the pipeline's
    default, from the transformer's ``sample_size`` 8, is 64 x 64).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel, LuminaPipeline
    from transformers import GemmaConfig, GemmaModel

    torch.manual_seed(seed)
    tokenizer = _tiny_gemma_tokenizer()
    text_hidden = 16
    text_encoder = GemmaModel(GemmaConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512)).eval()
    transformer = LuminaNextDiT2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=num_layers, num_attention_heads=2,
        num_kv_heads=1, multiple_of=16, cross_attention_dim=text_hidden).eval()
    with torch.no_grad():  # zero gates would silence the cross-attention (and the pad token is left uninitialised)
        for layer in transformer.layers:
            torch.nn.init.normal_(layer.gate, std=1.0)
        transformer.pad_token.zero_()
    return LuminaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae8(),
                          text_encoder=text_encoder, tokenizer=tokenizer)
