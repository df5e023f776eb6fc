"""A tiny random-weight ``GlmImagePipeline`` for tests, built offline (nothing is downloaded).

Text encoder: a one-layer ``T5EncoderModel`` over ``ByT5Tokenizer``'s bytes (the pipeline encodes only quoted
glyph text with it). VAE: a FLUX.1-style ``AutoencoderKL`` (/2) with ``latents_mean`` / ``latents_std``.
Transformer: two blocks, 2x2 patches, a 32-entry prior codebook. The autoregressive prior (a
``GlmImageForConditionalGeneration`` and its processor) is left out, as the Qwen-Image-Edit builder leaves out
Qwen2.5-VL: call the pipeline with prior tokens, see :func:`glm_image_call_kwargs`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import tiny_t5_encoder

PRIOR_CODES = 32  # the tiny transformer's prior codebook size


@needs("diffusers", "transformers")
def tiny_glm_image(seed: int = 0) -> Any:
    """A ``GlmImagePipeline`` without its AR prior (``vision_language_encoder`` and ``processor`` are ``None``).

    Images must be multiples of 8 pixels (VAE /2, then 2x2 patches; the pipeline wants height % 8): a 32x32 image
    is an 8x8 grid of 64 tokens.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        GlmImagePipeline,
        GlmImageTransformer2DModel,
    )
    from transformers import ByT5Tokenizer

    torch.manual_seed(seed)
    tokenizer = ByT5Tokenizer()
    text_encoder = tiny_t5_encoder(tokenizer)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=32, latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    transformer = GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=PRIOR_CODES).eval()
    return GlmImagePipeline(tokenizer=tokenizer, processor=None, text_encoder=text_encoder,
                            vision_language_encoder=None, vae=vae, transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler())


def glm_image_call_kwargs(image: list | None, prompts: int = 1, size: int = 32, steps: int = 2,
                          seed: int = 0) -> dict[str, Any]:
    """Call arguments for :func:`tiny_glm_image`: ``image`` as the pipeline takes it (a list of PIL images for
    one prompt, a list of such lists for several, ``None`` for text-to-image), random prior tokens in place of the
    AR prior's (one per token of the ``size`` x ``size`` target and of every condition image), CFG 2."""
    g = torch.Generator().manual_seed(seed)
    per_prompt = None if image is None else ([image] if prompts == 1 and not isinstance(image[0], list) else image)
    kwargs: dict[str, Any] = {
        "height": size, "width": size, "num_inference_steps": steps, "guidance_scale": 2.0, "output_type": "np",
        "prior_token_ids": torch.randint(0, PRIOR_CODES, (prompts, (size // 4) ** 2), generator=g),
        "generator": torch.Generator().manual_seed(seed), "image": image,
    }
    if per_prompt is not None:
        grids = [torch.tensor([[1, im.height // 4, im.width // 4] for im in images]) for images in per_prompt]
        kwargs["source_image_grid_thw"] = grids
        kwargs["prior_token_image_ids"] = [torch.randint(0, PRIOR_CODES, (int(g_.prod(-1).sum()),), generator=g)
                                           for g_ in grids]
    return kwargs
