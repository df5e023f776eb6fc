"""Tiny random-weight Stable Diffusion / SDXL pipelines (UNets), built offline, for the token-merging tests.

Nothing is downloaded: the CLIP text encoders come from ``transformers`` configs and the tokenizer from
:func:`.diffusers_tiny.tiny_clip_tokenizer`. The images are noise; the pipelines exercise diffusers' real code paths.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import tiny_clip_tokenizer

# the tiny SD 1.x UNet (``UNet2DConditionModel`` keyword arguments); SDXL's levels attend from the second one only
SD_UNET: dict[str, Any] = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (32, 64),
    "attention_head_dim": 8, "norm_num_groups": 8, "cross_attention_dim": 16,
    "down_block_types": ("CrossAttnDownBlock2D",) * 2, "up_block_types": ("CrossAttnUpBlock2D",) * 2}
XL_BLOCKS: dict[str, Any] = {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                             "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}


@needs("diffusers", "transformers")
def tiny_sd_vae(channels: int = 3) -> Any:
    """The tiny SD ``AutoencoderKL``: no downsampling, 4 latent channels, ``channels`` image channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=channels, out_channels=channels, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         latent_channels=4, norm_num_groups=8).eval()


@needs("diffusers", "transformers")
def tiny_stable_diffusion(seed: int = 0, xl: bool = False) -> Any:
    """A ``StableDiffusionPipeline`` (or ``StableDiffusionXLPipeline`` with ``xl=True``: two text encoders, no
    attention at the UNet's top level, as in SDXL) with tiny CLIP text encoders, VAE and UNet.

    Call it with :func:`sd_call_kwargs`. The VAE does not downsample: 16x16 images give 256 latent tokens at the UNet's
    top level, 64 at the next.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=16, projection_dim=16, bos_token_id=0,
                          eos_token_id=1, pad_token_id=1)
    vae = tiny_sd_vae()
    if not xl:
        unet = UNet2DConditionModel(**SD_UNET).eval()
        return StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text).eval(), tokenizer=tok, unet=unet,
                                       scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    unet = UNet2DConditionModel(**{**SD_UNET, **XL_BLOCKS, "cross_attention_dim": 32}, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8).eval()
    return StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text).eval(),
                                     text_encoder_2=CLIPTextModelWithProjection(text).eval(), tokenizer=tok,
                                     tokenizer_2=tiny_clip_tokenizer(), unet=unet,
                                     scheduler=DDIMScheduler(clip_sample=False, steps_offset=1))


def sd_call_kwargs(steps: int = 3, size: int = 16) -> dict[str, Any]:
    """Call arguments that fit :func:`tiny_stable_diffusion` (numpy output, a fixed generator)."""
    return {"num_inference_steps": steps, "height": size, "width": size, "output_type": "np",
            "generator": torch.Generator().manual_seed(0)}
