"""Tiny random-weight UNet pipelines beyond Stable Diffusion's own variants, built offline, for the token-merging
tests: audio (AudioLDM, AudioLDM 2), Marigold, GLIGEN, image variation, x4 upscaling, depth-to-image,
Paint-by-Example, Stable unCLIP, Pix2Pix-Zero, DiffEdit, LEdits++, and the pipelines token merging refuses
(Kandinsky 2.2 and DeepFloyd IF, whose UNets attend in ``SimpleCrossAttn`` blocks; the latent upscaler's
``KAttentionBlock`` UNet; VQ-Diffusion, whose transformer takes codebook ids).

:func:`tiny_unet_variant` builds one by its diffusers class name (``tiny_variant`` forwards these names here). The
text encoders are tiny CLIP / T5 / CLAP / GPT-2 models from ``transformers`` configs, the tokenizers those of
:mod:`.diffusers_tiny`; the audio pipelines have no tokenizer (call them with prompt embeddings). Images 16x16
(Marigold, ImageVariation, unCLIP and Paint-by-Example's example image: 32x32 for the CLIP image encoder; LEdits++
32x32), no VAE downsampling; audio ``audio_length_in_s=0.004`` gives a 16x8 latent.
"""
from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import tiny_t5_encoder, tiny_t5_tokenizer
from .diffusers_tiny_sd import SD_UNET, XL_BLOCKS, tiny_sd_vae, tiny_stable_diffusion

__all__ = ["UNET_VARIANTS", "tiny_unet_variant"]

# the UNet of each (keyword arguments over the tiny SD one, SD_UNET)
_UNETS: dict[str, dict[str, Any]] = {
    "StableDiffusionGLIGENPipeline": {"attention_type": "gated"},
    "StableDiffusionImageVariationPipeline": {},
    "StableDiffusionUpscalePipeline": {"in_channels": 7, "num_class_embeds": 100},  # + the low-res image; noise level
    "StableDiffusionDepth2ImgPipeline": {"in_channels": 5},  # + the depth map
    "PaintByExamplePipeline": {"in_channels": 9},  # + the masked image's latents + the mask
    "StableUnCLIPImg2ImgPipeline": {"class_embed_type": "projection", "projection_class_embeddings_input_dim": 32},
    "MarigoldDepthPipeline": {"in_channels": 8},  # + the image's latents
    "MarigoldNormalsPipeline": {"in_channels": 8},
    "StableDiffusionPix2PixZeroPipeline": {},
    "StableDiffusionDiffEditPipeline": {},
    # three levels: a 32x32 image's edit masks come from the 8x8 level's cross-attention maps
    "LEditsPPPipelineStableDiffusion": {"block_out_channels": (32, 32, 64), "down_block_types": (
        "CrossAttnDownBlock2D",) * 3, "up_block_types": ("CrossAttnUpBlock2D",) * 3},
}
UNET_VARIANTS = (*_UNETS, "AudioLDMPipeline", "AudioLDM2Pipeline", "KandinskyV22Pipeline", "IFPipeline",
                 "StableDiffusionLatentUpscalePipeline", "VQDiffusionPipeline")


def _unet(**kw: Any) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**SD_UNET, **kw}).eval()


def _clip_image() -> tuple[Any, Any]:
    """A tiny ``CLIPVisionModelWithProjection`` (32x32 images, 16-wide embeddings) and its image processor."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    return (CLIPVisionModelWithProjection(config).eval(),
            CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))


def _hifigan() -> Any:
    """A tiny ``SpeechT5HifiGan`` vocoder over 8 mel bins."""
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    return SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=8, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5]] * 2,
        normalize_before=False)).eval()


def _sd_unet_pipeline(name: str, seed: int) -> Any:
    """The SD 1.x-based pipelines of :data:`_UNETS` on :func:`.tiny_stable_diffusion`'s components."""
    import diffusers

    from .diffusers_tiny_variants import _pipeline

    sd = dict(tiny_stable_diffusion(seed=seed).components)
    torch.manual_seed(seed)
    comps: dict[str, Any] = {**sd, "unet": _unet(**_UNETS[name]), "safety_checker": None,
                             "requires_safety_checker": False, "depth_estimator": None, "feature_extractor": None}
    if name in ("StableDiffusionImageVariationPipeline", "StableUnCLIPImg2ImgPipeline"):
        comps["image_encoder"], comps["feature_extractor"] = _clip_image()
    if name == "PaintByExamplePipeline":
        from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder

        encoder, comps["feature_extractor"] = _clip_image()
        comps["image_encoder"] = PaintByExampleImageEncoder(encoder.config, proj_size=16).eval()
    if name == "StableDiffusionUpscalePipeline":
        comps.update(low_res_scheduler=diffusers.DDPMScheduler(), max_noise_level=50)
    if name == "StableUnCLIPImg2ImgPipeline":
        from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

        comps.update(image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=16),
                     image_noising_scheduler=diffusers.DDPMScheduler())
    if name in ("StableDiffusionPix2PixZeroPipeline", "StableDiffusionDiffEditPipeline"):  # no captioner
        comps.update(scheduler=diffusers.DDIMScheduler(clip_sample=False), caption_generator=None,
                     inverse_scheduler=diffusers.DDIMInverseScheduler(clip_sample=False), caption_processor=None)
    if name.startswith("LEditsPP"):  # its inversion needs an SDE DPM-Solver
        comps["scheduler"] = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)
    if name.startswith("Marigold"):
        comps.update(scheduler=diffusers.DDIMScheduler(
            prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False),
            prediction_type="depth" if "Depth" in name else "normals", default_denoising_steps=3,
            default_processing_resolution=16)
    return _pipeline(name, comps)


def _audio(name: str) -> Any:
    """AudioLDM (a CLAP text projection as the class embedding, no cross-attention input) / AudioLDM 2 (two
    cross-attention inputs; a T5 encoder only for its checks), SDXL-like UNets: no attention at the top level."""
    import diffusers
    from transformers import ClapTextConfig, ClapTextModelWithProjection, GPT2Config, GPT2LMHeadModel

    common = {"vae": tiny_sd_vae(channels=1), "tokenizer": None,
              "scheduler": diffusers.DDIMScheduler(clip_sample=False), "vocoder": _hifigan()}
    if name == "AudioLDMPipeline":
        unet = _unet(**XL_BLOCKS, cross_attention_dim=(32, 64), class_embed_type="simple_projection",
                     projection_class_embeddings_input_dim=16, class_embeddings_concat=True)
        text = ClapTextModelWithProjection(ClapTextConfig(
            hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, vocab_size=100,
            projection_dim=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()
        return diffusers.AudioLDMPipeline(**common, text_encoder=text, unet=unet)
    from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel

    unet = AudioLDM2UNet2DConditionModel(**{**SD_UNET, **XL_BLOCKS, "cross_attention_dim": ([None, 16, 32],) * 2}
                                         ).eval()
    language = GPT2LMHeadModel(GPT2Config(n_embd=16, n_head=2, n_layer=1, vocab_size=100, n_positions=32,
                                          bos_token_id=0, eos_token_id=0)).eval()
    return diffusers.AudioLDM2Pipeline(**common, text_encoder=None, text_encoder_2=tiny_t5_encoder(tiny_t5_tokenizer()),
                                       projection_model=None, language_model=language, tokenizer_2=None,
                                       feature_extractor=None, unet=unet)


def _refused(name: str) -> Any:
    """Pipelines whose model token merging refuses: UNets attending in other blocks, VQ-Diffusion's transformer."""
    import diffusers

    simple = {"down_block_types": ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
              "up_block_types": ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
              "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "resnet_time_scale_shift": "scale_shift"}
    if name == "KandinskyV22Pipeline":
        movq = diffusers.VQModel(block_out_channels=[32], down_block_types=["DownEncoderBlock2D"],
                                 up_block_types=["AttnUpDecoderBlock2D"], latent_channels=4, layers_per_block=1,
                                 norm_num_groups=8, norm_type="spatial", num_vq_embeddings=12, vq_embed_dim=4)
        unet = _unet(**simple, out_channels=8, addition_embed_type="image", encoder_hid_dim=16,
                     encoder_hid_dim_type="image_proj", cross_attention_dim=32)
        return diffusers.KandinskyV22Pipeline(unet=unet, scheduler=diffusers.DDPMScheduler(), movq=movq.eval())
    if name == "IFPipeline":
        unet = _unet(**simple, in_channels=3, out_channels=6, encoder_hid_dim=16, cross_attention_dim=32,
                     addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm")
        tok = tiny_t5_tokenizer()
        return diffusers.IFPipeline(tokenizer=tok, text_encoder=tiny_t5_encoder(tok), unet=unet,
                                    scheduler=diffusers.DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                    watermarker=None, requires_safety_checker=False)
    sd = tiny_stable_diffusion().components
    if name == "StableDiffusionLatentUpscalePipeline":  # K-diffusion blocks: KAttentionBlock
        unet = diffusers.UNet2DConditionModel(
            in_channels=8, out_channels=5, block_out_channels=(32, 64), attention_head_dim=8, norm_num_groups=None,
            down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D"), mid_block_type=None,
            up_block_types=("KCrossAttnUpBlock2D", "KUpBlock2D"), cross_attention_dim=16, act_fn="gelu",
            time_cond_proj_dim=160, conv_in_kernel=1, conv_out_kernel=1, resnet_time_scale_shift="scale_shift",
            time_embedding_type="fourier", timestep_post_act="gelu").eval()
        return diffusers.StableDiffusionLatentUpscalePipeline(
            vae=sd["vae"], text_encoder=sd["text_encoder"], tokenizer=sd["tokenizer"], unet=unet,
            scheduler=diffusers.EulerDiscreteScheduler(prediction_type="sample"))
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )

    vq = diffusers.VQModel(block_out_channels=[8], down_block_types=["DownEncoderBlock2D"], latent_channels=4,
                           up_block_types=["UpDecoderBlock2D"], norm_num_groups=8, num_vq_embeddings=12,
                           vq_embed_dim=4).eval()
    transformer = diffusers.Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, num_vector_embeds=13, sample_size=16, num_layers=1,
        cross_attention_dim=16, num_embeds_ada_norm=100, norm_type="ada_norm").eval()
    return diffusers.VQDiffusionPipeline(
        vqvae=vq, text_encoder=sd["text_encoder"], tokenizer=sd["tokenizer"], transformer=transformer,
        scheduler=diffusers.VQDiffusionScheduler(num_vec_classes=13),
        learned_classifier_free_sampling_embeddings=LearnedClassifierFreeSamplingEmbeddings(learnable=False))


@needs("diffusers", "transformers")
def tiny_unet_variant(name: str, seed: int = 0) -> Any:
    """The tiny random-weight pipeline of diffusers class ``name``, one of :data:`UNET_VARIANTS`
    (``ValueError`` for another name)."""
    if name not in UNET_VARIANTS:
        raise ValueError(f"name: no tiny UNet variant {name!r}; one of {', '.join(UNET_VARIANTS)}")
    torch.manual_seed(seed)
    if name in _UNETS:
        return _sd_unet_pipeline(name, seed)
    if name.startswith("AudioLDM"):
        return _audio(name)
    return _refused(name)
