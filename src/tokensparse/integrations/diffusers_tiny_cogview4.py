"""Tiny random-weight ``CogView4Pipeline`` (text-to-image) for tests, built offline (nothing is downloaded).

Text encoder: a 2-layer ``GlmModel`` over :func:`~.diffusers_tiny.tiny_qwen_tokenizer`'s byte vocabulary, which here,
like GLM's tokenizer, starts every prompt with a special token and pads on the left (an empty negative prompt
would otherwise be no token at all, which the text encoder cannot run). VAE: the
FLUX.1-style ``AutoencoderKL`` of the other tiny pipelines (/2). Scheduler: flow matching with CogView4's linear
dynamic shift.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import _tiny_flux_vae, tiny_qwen_tokenizer


def _tiny_glm_tokenizer() -> Any:
    """:func:`~.diffusers_tiny.tiny_qwen_tokenizer`, prefixing ``<|im_start|>`` to each text, left-padded."""
    from tokenizers.processors import TemplateProcessing

    tok = tiny_qwen_tokenizer()
    start = "<|im_start|>"
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{start} $A", pair=f"{start} $A $B", special_tokens=[(start, tok.convert_tokens_to_ids(start))])
    tok.padding_side = "left"
    return tok


@needs("diffusers", "transformers")
def tiny_cogview4(seed: int = 0, num_layers: int = 2) -> Any:
    """A ``CogView4Pipeline`` with a tiny GLM text encoder, VAE (/2) and CogView4 transformer (dim 32, patch 2).

    Height and width must be multiples of 16 (the pipeline's check): an ``H x W`` image is an ``H/4 x W/4`` grid of
    tokens (the pipeline's default, 1024, is far too big: pass them).
    """
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    torch.manual_seed(seed)
    text_hidden = 16
    text_encoder = GlmModel(GlmConfig(
        vocab_size=260, hidden_size=text_hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512, pad_token_id=None)).eval()
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, text_embed_dim=text_hidden, time_embed_dim=16, condition_dim=8, pos_embed_max_size=32,
        sample_size=16).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")
    return CogView4Pipeline(tokenizer=_tiny_glm_tokenizer(), text_encoder=text_encoder, vae=_tiny_flux_vae(4),
                            transformer=transformer, scheduler=scheduler)
