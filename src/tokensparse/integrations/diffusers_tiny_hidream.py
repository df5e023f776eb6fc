"""Tiny random-weight ``HiDreamImagePipeline`` (text-to-image) for tests, built offline (nothing is downloaded).

Text encoders: two 1-layer ``CLIPTextModelWithProjection`` over :func:`~.diffusers_tiny.tiny_clip_tokenizer` (their
pooled outputs, 16 + 16 wide, condition the timestep), :func:`~.diffusers_tiny.tiny_t5_encoder`, and a 2-layer
``LlamaForCausalLM`` over :func:`~.diffusers_tiny.tiny_qwen_tokenizer`'s byte vocabulary, whose hidden states feed the
blocks (``llama_layers``). VAE: the FLUX.1-style ``AutoencoderKL`` of the other tiny pipelines (/2). Scheduler: flow
matching. Pass a short ``max_sequence_length`` (16): every prompt is padded to it.

The pipeline rescales every request to the area of its ``default_sample_size`` (128 latent pixels a side: far too big
here); the builder sets it to 16, so images come out at about 32 x 32 pixels (a square one: an 8 x 8 grid of tokens).
Non-square latents are padded to the transformer's ``max_seq`` tokens (here 256), their padding masked.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import _tiny_flux_vae, tiny_clip_tokenizer, tiny_qwen_tokenizer, tiny_t5_encoder, tiny_t5_tokenizer


def _tiny_clip_with_projection(tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=128, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()


@needs("diffusers", "transformers")
def tiny_hidream(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2) -> Any:
    """A ``HiDreamImagePipeline`` with tiny CLIP, T5 and Llama text encoders, VAE (/2) and HiDream transformer (dim 32,
    patch 2, 4 routed experts; ``num_layers`` double-stream and ``num_single_layers`` single-stream blocks)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    clip_tok, t5_tok, llama_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer(), tiny_qwen_tokenizer()
    clip_1, clip_2 = _tiny_clip_with_projection(clip_tok), _tiny_clip_with_projection(clip_tok)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(llama_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=256)).eval()
    blocks = num_layers + num_single_layers
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, caption_channels=[16, 16], text_emb_dim=32,
        num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(8, 4, 4), max_resolution=(32, 32),
        llama_layers=[i % 2 for i in range(blocks)]).eval()
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_flux_vae(4), text_encoder=clip_1, tokenizer=clip_tok,
        text_encoder_2=clip_2, tokenizer_2=clip_tok, text_encoder_3=tiny_t5_encoder(t5_tok), tokenizer_3=t5_tok,
        text_encoder_4=llama, tokenizer_4=llama_tok, transformer=transformer)
    pipe.default_sample_size = 16
    return pipe
