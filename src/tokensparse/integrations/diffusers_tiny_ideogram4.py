"""Tiny random-weight ``Ideogram4Pipeline`` (text-to-image) for tests, built offline (nothing is downloaded).

Text encoder: the ``Qwen3VLModel`` inside :func:`~.diffusers_tiny_vl.tiny_qwen3_vl`, 36 text layers of width 16 (the
pipeline taps 13 of them, up to layer 35: per-token features of width 208), with its processor's tokenizer. VAE: a
two-level ``AutoencoderKLFlux2`` (/2, then the pipeline's 2x2 patches: /4 in all). Scheduler: flow matching. The
conditional and the unconditional transformer are two models of the same shape, with weights of their own.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import tiny_flux2_vae
from .diffusers_tiny_vl import tiny_qwen3_vl_with_processor

_TAPS = 13  # the pipeline's QWEN3_VL_ACTIVATION_LAYERS


@needs("diffusers", "transformers")
def tiny_ideogram4(seed: int = 0, num_layers: int = 2) -> Any:
    """An ``Ideogram4Pipeline`` with a tiny Qwen3-VL text encoder, VAE (/4 with the pipeline's patches) and two
    Ideogram 4 transformers (dim 32, 2 heads, ``num_layers`` blocks each).

    Height and width must be multiples of 4: an ``H x W`` image is an ``H/4 x W/4`` grid of tokens (the pipeline's
    default, 2048, is far too big: pass them). Its default ``guidance_schedule`` has 48 steps: with fewer
    ``num_inference_steps`` pass ``guidance_scale`` and ``guidance_schedule=None``; ``max_sequence_length`` must hold
    the chat-formatted prompt's bytes.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        Ideogram4Pipeline,
        Ideogram4Transformer2DModel,
    )

    torch.manual_seed(seed)
    processor, text_encoder = tiny_qwen3_vl_with_processor(layers=36)
    vae = tiny_flux2_vae()

    def transformer() -> Any:
        return Ideogram4Transformer2DModel(
            in_channels=16, num_layers=num_layers, attention_head_dim=16, num_attention_heads=2, intermediate_size=64,
            adaln_dim=16, llm_features_dim=_TAPS * 16, rope_theta=10000, mrope_section=(4, 2, 2)).eval()

    return Ideogram4Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                             text_encoder=text_encoder.model.eval(), tokenizer=processor.tokenizer,
                             transformer=transformer(), unconditional_transformer=transformer())
