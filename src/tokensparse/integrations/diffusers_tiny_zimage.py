"""Tiny random-weight ``ZImageOmniPipeline`` / ``ZImagePipeline`` (text-to-image) for tests, built offline (nothing
is downloaded).

Text encoder: a 2-layer ``Qwen3ForCausalLM`` over :func:`~.diffusers_tiny.tiny_qwen_tokenizer`'s byte vocabulary
(the pipeline's ``<|vision_start|>`` markers are plain bytes to it). SigLIP: a 1-layer ``Siglip2VisionModel`` with
8-pixel patches and its PIL image processor (at most 16 patches). VAE: the FLUX.1-style ``AutoencoderKL`` of the
other tiny pipelines (/2), in bfloat16: the pipeline casts the reference pixels to bfloat16 before encoding them.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import _tiny_flux_vae, tiny_qwen_tokenizer


def _tiny_text_encoder(hidden: int) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=260, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512)).eval()


def _tiny_transformer(text_hidden: int, siglip_feat_dim: int | None, n_layers: int = 1) -> Any:
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=n_layers, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=text_hidden, siglip_feat_dim=siglip_feat_dim, axes_dims=[4, 6, 6],
        axes_lens=[512, 64, 64]).eval()


@needs("diffusers", "transformers")
def tiny_z_image(seed: int = 0, n_layers: int = 2) -> Any:
    """A text-to-image ``ZImagePipeline`` with a tiny Qwen3 text encoder, VAE (float32) and Z-Image transformer.

    Height and width must be multiples of 4 (the pipeline's default, 1024, is far too big: pass them); an ``H x W``
    image is an ``H/4 x W/4`` grid of tokens. Use ``max_sequence_length=32`` or more.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    torch.manual_seed(seed)
    text_hidden = 16
    text_encoder = _tiny_text_encoder(text_hidden)
    transformer = _tiny_transformer(text_hidden, None, n_layers=n_layers)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_flux_vae(latent_channels=4),
                          text_encoder=text_encoder, tokenizer=tiny_qwen_tokenizer(), transformer=transformer)


@needs("diffusers", "transformers")
def tiny_z_image_omni(seed: int = 0) -> Any:
    """A ``ZImageOmniPipeline`` with a tiny Qwen3 text encoder, SigLIP2 vision model, VAE and Z-Image transformer.

    Images must be at least 64 pixels a side (the pipeline's check) and multiples of 4: an ``H x W`` image is an
    ``H/4 x W/4`` grid of tokens (64x64: 16x16 = 256). Use ``max_sequence_length=32`` or more.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageOmniPipeline
    from transformers import Siglip2VisionConfig, Siglip2VisionModel
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    torch.manual_seed(seed)
    text_hidden = 16
    text_encoder = _tiny_text_encoder(text_hidden)
    siglip = Siglip2VisionModel(Siglip2VisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8,
        num_patches=16)).eval()
    transformer = _tiny_transformer(text_hidden, 16)
    vae = torch.nn.Module.to(_tiny_flux_vae(latent_channels=4), torch.bfloat16)  # ModelMixin.to warns needlessly
    return ZImageOmniPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=text_encoder, tokenizer=tiny_qwen_tokenizer(), transformer=transformer, siglip=siglip,
        siglip_processor=Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16))
