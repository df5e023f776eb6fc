"""Tiny random-weight variants of the diffusers pipelines token merging supports (img2img, inpainting, ControlNet,
Control / Fill, PAG, ...), built offline from the other tiny builders' components, for tests.

:func:`tiny_variant` builds one by its diffusers class name. Each reuses the components of its family's tiny
pipeline (``tiny_flux_kontext``, ``tiny_chroma``, ``tiny_flux2_klein``, ``tiny_z_image``, ``tiny_cogview4``,
``tiny_qwen_image_edit_plus``, ``tiny_longcat_image_edit``, ``tiny_stable_diffusion``) and adds what the variant
needs: a transformer or UNet taking more input channels (Control, Fill, InstructPix2Pix, SD inpainting), a
ControlNet / T2I-Adapter, a scheduler. SD3, PixArt and DiT, which have no tiny pipeline elsewhere, are built here.
ControlNets' zero-initialised output projections get small random values, so that they change the output.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import (
    _tiny_flux_vae,
    tiny_clip_tokenizer,
    tiny_flux2_klein,
    tiny_flux_kontext,
    tiny_longcat_image_edit,
    tiny_qwen_image_edit_plus,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
)
from .diffusers_tiny_chroma import tiny_chroma
from .diffusers_tiny_cogview4 import tiny_cogview4
from .diffusers_tiny_sd import tiny_stable_diffusion
from .diffusers_tiny_zimage import tiny_z_image

__all__ = ["tiny_variant"]


def _nonzero(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Give ``module``'s all-zero parameters (ControlNets' zero-initialised projections) small random values."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def _pipeline(name: str, components: dict[str, Any], **extra: Any) -> Any:
    """``diffusers.<name>`` built from those of ``components`` and ``extra`` its constructor takes."""
    import diffusers

    cls = getattr(diffusers, name)
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in {**components, **extra}.items() if k in params})


def _flux(name: str, seed: int) -> Any:
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    comps = dict(tiny_flux_kontext(seed=seed).components)
    extra: dict[str, Any] = {}
    in_channels = 48 if "Fill" in name else 32 if name.startswith("FluxControl") and "Net" not in name else 16
    if in_channels != 16:  # Control: latents + control latents; Fill: latents + masked-image latents + mask
        comps["transformer"] = FluxTransformer2DModel(
            patch_size=1, in_channels=in_channels, out_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    if "ControlNet" in name:
        extra["controlnet"] = _nonzero(FluxControlNetModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=[4, 6, 6]))
    return _pipeline(name, comps, **extra)


def _sd3(name: str) -> Any:
    """SD3 with two tiny CLIP text encoders and no T5 (its embeddings are zeros); inpainting: 16 latent channels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3ControlNetModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    latent = 16 if name == "StableDiffusion3InpaintPipeline" else 4
    tok = tiny_clip_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=16, projection_dim=16, bos_token_id=0,
                          eos_token_id=1, pad_token_id=1)
    common = {"patch_size": 2, "attention_head_dim": 8, "num_attention_heads": 4, "joint_attention_dim": 32,
              "caption_projection_dim": 32, "pooled_projection_dim": 32, "pos_embed_max_size": 16}
    transformer = SD3Transformer2DModel(sample_size=16, in_channels=latent, out_channels=latent, num_layers=2,
                                        **common).eval()
    extra: dict[str, Any] = {"pag_applied_layers": ["blocks.1"]} if "PAG" in name else {}
    if "ControlNet" in name:  # the inpainting ControlNet takes the mask as one more channel
        extra["controlnet"] = _nonzero(SD3ControlNetModel(
            sample_size=16, in_channels=4, out_channels=4, num_layers=1,
            extra_conditioning_channels=int("Inpaint" in name), **common))
    comps = {"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(), "vae": _tiny_flux_vae(latent),
             "text_encoder": CLIPTextModelWithProjection(text).eval(), "tokenizer": tok,
             "text_encoder_2": CLIPTextModelWithProjection(text).eval(), "tokenizer_2": tiny_clip_tokenizer(),
             "text_encoder_3": None, "tokenizer_3": None}
    return _pipeline(name, comps, **extra)


def _pixart_dit(name: str) -> Any:
    """PixArt-alpha / -Sigma (tiny T5) and DiT (class-conditional): 2 blocks, 2x2 patches, the /2 VAE."""
    from diffusers import DiTTransformer2DModel, DPMSolverMultistepScheduler, PixArtTransformer2DModel

    comps: dict[str, Any] = {"vae": _tiny_flux_vae(4), "scheduler": DPMSolverMultistepScheduler()}
    if name == "DiTPipeline":
        comps["transformer"] = DiTTransformer2DModel(in_channels=4, out_channels=8, num_layers=2, attention_head_dim=8,
                                                     num_attention_heads=2, sample_size=16, patch_size=2).eval()
        return _pipeline(name, comps, id2label={0: "cat", 1: "dog"})
    tok = tiny_t5_tokenizer()
    comps["transformer"] = PixArtTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=16,
        in_channels=4, out_channels=8, cross_attention_dim=16, norm_num_groups=4,
        use_additional_conditions=False).eval()
    return _pipeline(name, {**comps, "tokenizer": tok, "text_encoder": tiny_t5_encoder(tok)},
                     pag_applied_layers=["blocks.1"])


def _stable_diffusion(name: str, seed: int) -> Any:
    """SD 1.x / SDXL variants on :func:`.tiny_stable_diffusion`'s components (16x16 images, 16x16 latents)."""
    import diffusers

    xl = "XL" in name
    comps = dict(tiny_stable_diffusion(seed=seed, xl=xl).components)
    unet = comps["unet"]
    extra: dict[str, Any] = {}
    in_channels = 8 if "InstructPix2Pix" in name else 9 if name == "StableDiffusionInpaintPipeline" else 4
    if in_channels != 4:  # + the source image's latents (+ the mask)
        comps["unet"] = diffusers.UNet2DConditionModel.from_config(unet.config, in_channels=in_channels).eval()
    if name.startswith("LatentConsistencyModel"):
        comps["unet"] = diffusers.UNet2DConditionModel.from_config(unet.config, time_cond_proj_dim=8).eval()
        comps["scheduler"] = diffusers.LCMScheduler()
    if "PAG" in name:
        extra["pag_applied_layers"] = ["mid"] if xl else ["down"]
    if "ControlNetXS" in name:  # UNetControlNetXSModel fuses a UNet and its adapter (2 layers per block)
        base = diffusers.UNet2DConditionModel.from_config(unet.config, layers_per_block=2).eval()
        adapter = _nonzero(diffusers.ControlNetXSAdapter.from_unet(
            base, size_ratio=1, learn_time_embedding=True, conditioning_embedding_out_channels=(16,)))
        comps["unet"], extra["controlnet"] = diffusers.UNetControlNetXSModel.from_unet(base, adapter).eval(), adapter
    elif "ControlNetUnion" in name:
        cn = diffusers.ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=(16,))
        extra["controlnet"] = _nonzero(diffusers.ControlNetUnionModel.from_config(
            cn.config, num_trans_channel=32, num_proj_channel=32, num_trans_head=2, num_trans_layer=1))
    elif "ControlNet" in name:
        extra["controlnet"] = _nonzero(diffusers.ControlNetModel.from_unet(unet,
                                                                           conditioning_embedding_out_channels=(16,)))
    if "Adapter" in name:  # one feature map per down block, of its output's size (SDXL: after its downsampler)
        extra["adapter"] = _nonzero(diffusers.T2IAdapter(
            in_channels=3, channels=[32, 64, 64, 64] if xl else [32, 64], num_res_blocks=1,
            downscale_factor=2 if xl else 1, adapter_type="full_adapter_xl" if xl else "full_adapter"))
    return _pipeline(name, comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **extra)


def _qwen(name: str, seed: int) -> Any:
    """Qwen-Image variants on :func:`.tiny_qwen_image_edit_plus`'s components (no text encoder: call them with
    ``prompt_embeds``)."""
    from diffusers import QwenImageControlNetModel

    extra: dict[str, Any] = {}
    if "ControlNet" in name:  # the inpainting ControlNet takes the packed mask as 4 more channels
        extra["controlnet"] = _nonzero(QwenImageControlNetModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, axes_dims_rope=(4, 6, 6), extra_condition_channels=4 * int("Inpaint" in name)))
    return _pipeline(name, dict(tiny_qwen_image_edit_plus(seed=seed).components), **extra)


def _dit_family(name: str, seed: int) -> Any:
    """Chroma, FLUX.2, Z-Image, CogView4, LongCat-Image variants on their tiny pipelines' components."""
    import diffusers

    if name.startswith("Chroma"):
        pipe = _pipeline(name, dict(tiny_chroma(seed=seed).components))
        if "Inpaint" in name:  # diffusers' ChromaInpaintPipeline reads a config entry Chroma's transformer lacks
            pipe.transformer.register_to_config(guidance_embeds=False)
        return pipe
    if name.startswith("Flux2"):  # Flux2Pipeline (FLUX.2 [dev]): no Mistral text encoder, call with prompt_embeds
        comps = dict(tiny_flux2_klein(seed=seed).components)
        return _pipeline(name, comps if "Klein" in name else {**comps, "text_encoder": None, "tokenizer": None})
    if name.startswith("ZImage"):
        extra: dict[str, Any] = {}
        if "ControlNet" in name:  # inpainting: control latents + mask + masked-image latents (4 + 1 + 4)
            extra["controlnet"] = _nonzero(diffusers.ZImageControlNetModel(
                control_layers_places=[0], control_refiner_layers_places=[0], control_in_dim=9 if "Inpaint" in name
                else 4, all_patch_size=(2,), all_f_patch_size=(1,), dim=32, n_refiner_layers=1, n_heads=2,
                n_kv_heads=2))
        return _pipeline(name, dict(tiny_z_image(seed=seed).components), **extra)
    if name == "CogView4ControlPipeline":  # latents + control latents
        comps = dict(tiny_cogview4(seed=seed).components)
        comps["transformer"] = diffusers.CogView4Transformer2DModel.from_config(comps["transformer"].config,
                                                                                in_channels=8).eval()
        return _pipeline(name, comps)
    if name == "LongCatImagePipeline":
        return _pipeline(name, dict(tiny_longcat_image_edit(seed=seed).components))
    raise ValueError(f"name: no tiny variant {name!r}")


@needs("diffusers", "transformers")
def tiny_variant(name: str, seed: int = 0) -> Any:
    """The tiny random-weight pipeline of diffusers class ``name`` (e.g. ``"FluxFillPipeline"``,
    ``"StableDiffusionXLControlNetPipeline"``, ``"ZImageControlNetPipeline"``); ``ValueError`` for a name it does not
    build; the names of :data:`.diffusers_tiny_unets.UNET_VARIANTS` come from :func:`.tiny_unet_variant`. Image
    sizes: FLUX.1 / FLUX.2 / Chroma / Z-Image / SD3 / PixArt / DiT / Qwen-Image / LongCat 32x32 (8x8
    tokens), CogView4 multiples of 16, SD / SDXL 16x16 (no VAE downsampling)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a diffusers pipeline class name, got {type(name).__name__}")
    from .diffusers_tiny_unets import UNET_VARIANTS, tiny_unet_variant

    if name in UNET_VARIANTS:  # AudioLDM, Marigold, GLIGEN, ..., and the UNets token merging refuses
        return tiny_unet_variant(name, seed)
    torch.manual_seed(seed)
    if name.startswith("Flux") and not name.startswith("Flux2"):
        return _flux(name, seed)
    if name.startswith("StableDiffusion3"):
        return _sd3(name)
    if name.startswith(("PixArt", "DiT")):
        return _pixart_dit(name)
    if name.startswith(("StableDiffusion", "LatentConsistencyModel")):
        return _stable_diffusion(name, seed)
    if name.startswith("QwenImage"):
        return _qwen(name, seed)
    return _dit_family(name, seed)
