"""Tiny random-weight ``BriaFiboPipeline`` and ``BriaFiboEditPipeline`` for tests, built offline (nothing is
downloaded).

Text encoder: a 2-layer ``SmolLM3ForCausalLM`` over :func:`~.diffusers_tiny.tiny_qwen_tokenizer`'s byte
vocabulary, its embedding grown to hold the pipeline's hard-coded empty-prompt token 128000. VAE: a Wan 2.2-style
``AutoencoderKLWan`` (patch 2, three downsamples: 16 pixels per latent cell, as the pipeline assumes).
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import tiny_qwen_tokenizer

EMPTY_PROMPT_TOKEN = 128000  # BriaFiboEditPipeline.get_prompt_embeds encodes "" as this one token


def _components(seed: int) -> dict[str, Any]:
    """The tiny pipelines' components (the same random weights for both pipelines at one seed)."""
    from diffusers import AutoencoderKLWan, BriaFiboTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    text_encoder = SmolLM3ForCausalLM(SmolLM3Config(
        vocab_size=EMPTY_PROMPT_TOKEN + 1, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=None))
    vae = AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, False, False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        is_residual=True, patch_size=2, in_channels=12, out_channels=12)
    transformer = BriaFiboTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=[4, 6, 6], text_encoder_dim=16)  # joint dim: 2 hidden states
    return {"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae,
            "text_encoder": text_encoder, "tokenizer": tokenizer}


@needs("diffusers", "transformers")
def tiny_bria_fibo(seed: int = 0) -> Any:
    """A text-to-image ``BriaFiboPipeline`` with :func:`tiny_bria_fibo_edit`'s components (same weights per seed).

    A 128x128 image is an 8x8 grid of tokens (no patching); prompts are plain text or FIBO's JSON.
    """
    from diffusers import BriaFiboPipeline

    return BriaFiboPipeline(**_components(seed))


@needs("diffusers", "transformers")
def tiny_bria_fibo_edit(seed: int = 0) -> Any:
    """A ``BriaFiboEditPipeline`` with a tiny SmolLM3 text encoder, Wan VAE and FIBO transformer.

    A 128x128 image is an 8x8 grid of tokens (no patching); prompts must be edit JSON
    (``'{"edit_instruction": "..."}'``).
    """
    from diffusers.pipelines.bria_fibo.pipeline_bria_fibo_edit import BriaFiboEditPipeline

    return BriaFiboEditPipeline(**_components(seed))
