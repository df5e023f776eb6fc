"""Tiny random-weight ``PRXPipeline`` (text-to-image) for tests, built offline (nothing is downloaded).

Text encoder: a 2-layer, 16-wide ``T5GemmaEncoder`` over :func:`~.diffusers_tiny.tiny_qwen_tokenizer`'s byte
vocabulary, its ``model_max_length`` 16 (the pipeline pads every prompt to it). VAE: the FLUX.1-style
``AutoencoderKL`` of the other tiny pipelines (/2). Scheduler: flow matching. Call it with
``use_resolution_binning=False`` and a small ``height`` / ``width`` (multiples of 4): the pipeline's bins (>= 256 px)
are far too big here.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import _tiny_flux_vae, tiny_qwen_tokenizer


@needs("diffusers", "transformers")
def tiny_prx(seed: int = 0, depth: int = 2) -> Any:
    """A ``PRXPipeline`` with a tiny T5Gemma text encoder, VAE (/2) and PRX transformer (dim 32, patch 2, ``depth``
    blocks, their zero-initialised modulation drawn at random): an ``H x W`` image is an ``H/4 x W/4`` grid of tokens.

    The pipeline cleans prompts with ``ftfy`` (an optional diffusers dependency: install it, or pass ``prompt_embeds``).
    Its classifier-free guidance runs one prompt at a time (it repeats the timestep twice, whatever the batch)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline, PRXTransformer2DModel
    from transformers import T5GemmaModuleConfig
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.model_max_length = 16
    text_hidden = 16
    text_encoder = T5GemmaEncoder(T5GemmaModuleConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256, dropout_rate=0.0,
        attention_dropout=0.0)).eval()
    transformer = PRXTransformer2DModel(
        in_channels=4, patch_size=2, context_in_dim=text_hidden, hidden_size=32, mlp_ratio=2.0, num_heads=2,
        depth=depth, axes_dim=[8, 8]).eval()
    for blk in transformer.blocks:  # zero-initialised modulation: gates of 0, blocks that change nothing; random here
        torch.nn.init.normal_(blk.modulation.lin.weight, std=0.1)
        torch.nn.init.normal_(blk.modulation.lin.bias, std=0.1)
    return PRXPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder,
                       tokenizer=tokenizer, vae=_tiny_flux_vae(4), default_sample_size=256)
