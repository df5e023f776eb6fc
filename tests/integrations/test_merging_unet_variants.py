"""Token merging on UNet pipelines beyond Stable Diffusion's own variants (audio, Marigold, GLIGEN, image variation,
upscaling, depth-to-image, Paint-by-Example, Stable unCLIP, Pix2Pix-Zero, DiffEdit, LEdits++), tiny and random-weight
(:func:`~tokensparse.integrations.diffusers_tiny_unets.tiny_unet_variant`): each merges, deterministically, and
removing merging gives the dense output exactly. The pipelines whose models it cannot merge (Kandinsky 2.2, DeepFloyd
IF, the latent upscaler, VQ-Diffusion) are refused at apply time, naming the pipeline and the reason, and so is
merging the cross-attention maps a pipeline reads (Attend-and-Excite, Pix2Pix-Zero, LEdits++)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tokensparse.integrations.diffusers_tiny_unets import tiny_unet_variant  # noqa: E402
from tokensparse.integrations.merging_hooks import (  # noqa: E402
    apply_token_merging,
    merging_state,
    merging_supports,
    remove_token_merging,
)
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from .test_merging_variants import (  # noqa: E402
    _base,
    _edit,
    _image,
    _mask,
    _no_size,
    merges_deterministically_and_removes_exactly,
)


def _embeds(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(*shape, generator=g) for shape in shapes]


def _audioldm() -> dict:
    """AudioLDM: CLAP text embeddings (one vector a prompt); 0.004 s of 16 kHz audio, a 16x8 latent."""
    pos, neg = _embeds((1, 16), (1, 16))
    return {"prompt_embeds": pos, "negative_prompt_embeds": neg, "audio_length_in_s": 0.004, "num_inference_steps": 3,
            "output_type": "np", "generator": torch.Generator().manual_seed(0)}


def _audioldm2() -> dict:
    """AudioLDM 2: T5-side embeddings (with a padding mask) and the language model's generated embeddings."""
    pos, neg, gen, neg_gen = _embeds((1, 5, 32), (1, 5, 32), (1, 4, 16), (1, 4, 16))
    mask = torch.ones(1, 5, dtype=torch.long)
    mask[:, -1] = 0
    return {**_audioldm(), "prompt_embeds": pos, "negative_prompt_embeds": neg, "generated_prompt_embeds": gen,
            "negative_generated_prompt_embeds": neg_gen, "attention_mask": mask, "negative_attention_mask": mask}


def _marigold(**kw: object) -> dict:
    return {"image": _image(0, 16), "num_inference_steps": 3, "processing_resolution": 16, "output_type": "np",
            "generator": torch.Generator().manual_seed(0), **kw}


def _no_prompt(call: dict) -> dict:
    return {k: v for k, v in call.items() if k != "prompt"}


def _pix2pix_zero() -> dict:
    """Pix2Pix-Zero: the edit direction from two sets of text embeddings (the tiny CLIP's 16 tokens, 16 wide)."""
    source, target = _embeds((2, 16, 16), (2, 16, 16))
    return _base(16, source_embeds=source, target_embeds=target, cross_attention_guidance_amount=0.15)


def _ledits(pipe: object, **kw: object) -> Callable[[], dict]:
    """LEdits++ edits the image its ``invert`` stored (done here once, unmerged): masks from cross-attention maps."""
    pipe.invert(image=_image(0, 32), num_inversion_steps=4, skip=0.25, generator=torch.Generator().manual_seed(0))
    return lambda: {"editing_prompt": ["a dog"], "edit_guidance_scale": 5.0, "edit_threshold": 0.75,
                    "use_cross_attn_mask": True, "output_type": "np", "generator": torch.Generator().manual_seed(0),
                    **kw}


CALLS: dict[str, Callable[[], dict]] = {
    "AudioLDMPipeline": _audioldm,
    "AudioLDM2Pipeline": _audioldm2,
    "MarigoldDepthPipeline": _marigold,
    "MarigoldNormalsPipeline": lambda: _marigold(ensemble_size=3, batch_size=2),  # calls of 2 samples, then 1
    "StableDiffusionGLIGENPipeline": lambda: _base(16, gligen_phrases=["a cat"], gligen_boxes=[[0.1, 0.1, 0.6, 0.6]],
                                                   gligen_scheduled_sampling_beta=1.0),
    "StableDiffusionImageVariationPipeline": lambda: _no_prompt(_base(16, image=_image(1, 32))),
    "StableDiffusionUpscalePipeline": lambda: _no_size(_base(16, image=_image(1, 16), noise_level=20)),
    "StableDiffusionDepth2ImgPipeline": lambda: _no_size(_edit(16, depth_map=torch.rand(
        1, 16, 16, generator=torch.Generator().manual_seed(4)))),
    "PaintByExamplePipeline": lambda: _no_prompt(_base(16, image=_image(0, 16), mask_image=_mask(16),
                                                       example_image=_image(2, 32))),
    "StableUnCLIPImg2ImgPipeline": lambda: _base(16, image=_image(1, 32)),
    "StableDiffusionPix2PixZeroPipeline": _pix2pix_zero,
}


@pytest.mark.parametrize("name", list(CALLS))
def test_unet_variant_merges_deterministically_and_removes_exactly(name: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    # the audio UNets, like SDXL's, have no attention at the top level
    merges_deterministically_and_removes_exactly(tiny_unet_variant(name), CALLS[name], caplog,
                                                 max_downsample=2 if name.startswith("AudioLDM") else 1)


def test_ledits_merges_around_the_cross_attention_maps_it_reads(caplog: pytest.LogCaptureFixture) -> None:
    # its edit masks come from the 8x8 level's cross-attention maps: self-attention and MLPs merge at every level
    pipe = tiny_unet_variant("LEditsPPPipelineStableDiffusion")
    pipe.set_progress_bar_config(disable=True)
    merges_deterministically_and_removes_exactly(pipe, _ledits(pipe), caplog, max_downsample=4)


def test_diffedit_merges_its_mask_inversion_and_edit(caplog: pytest.LogCaptureFixture) -> None:
    pipe = tiny_unet_variant("StableDiffusionDiffEditPipeline")
    pipe.set_progress_bar_config(disable=True)

    def call() -> dict:  # the mask (two prompts' noise estimates) and the inversion run merged too
        kw = {"num_inference_steps": 3, "generator": torch.Generator().manual_seed(0)}
        mask = pipe.generate_mask(image=_image(0, 16), source_prompt="a cat", target_prompt="a dog",
                                  num_maps_per_mask=2, mask_thresholding_ratio=1.0, output_type="np", **kw)
        inverted = pipe.invert(prompt="a cat", image=_image(0, 16), **kw).latents
        return {"prompt": "a dog", "mask_image": mask, "image_latents": inverted, "output_type": "np", **kw}

    merges_deterministically_and_removes_exactly(pipe, call, caplog)


@pytest.mark.parametrize("name", ["StableDiffusionPix2PixZeroPipeline", "LEditsPPPipelineStableDiffusion",
                                  "LEditsPPPipelineStableDiffusionXL", "StableDiffusionAttendAndExcitePipeline"])
def test_merging_the_cross_attention_maps_a_pipeline_reads_is_refused(name: str) -> None:
    # Pix2Pix-Zero compared maps of differently merged passes (a size mismatch inside its loss with a threshold);
    # LEdits++ lost the merged level's maps (torch.cat of nothing) or, at some ratios, read merged ones as a grid
    if name == "LEditsPPPipelineStableDiffusionXL":
        from tokensparse.integrations.diffusers_tiny_sd import tiny_stable_diffusion

        pipe = diffusers.LEditsPPPipelineStableDiffusionXL(**{
            **tiny_stable_diffusion(xl=True).components, "image_encoder": None, "feature_extractor": None,
            "scheduler": diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)})
    else:
        from tokensparse.integrations.diffusers_tiny_variants import tiny_variant

        pipe = tiny_variant(name)
    with pytest.raises(ValueError, match=f"cfg.merge_cross=True does not work with {name}: it .*cross-attention "
                                         "maps.*use merge_cross=False"):
        apply_token_merging(pipe, TokenMergingConfig(threshold=0.5, merge_cross=True, recompute_every=2))
    assert merging_state(pipe) is None
    apply_token_merging(pipe, TokenMergingConfig(ratio=0.5))  # self-attention and MLPs only: accepted
    remove_token_merging(pipe)


@pytest.mark.parametrize(("name", "why"), [
    ("KandinskyV22Pipeline", "SimpleCrossAttnDownBlock2D, SimpleCrossAttnUpBlock2D, UNetMidBlock2DSimpleCrossAttn"),
    ("IFPipeline", "SimpleCrossAttnDownBlock2D, SimpleCrossAttnUpBlock2D, UNetMidBlock2DSimpleCrossAttn"),
    ("StableDiffusionLatentUpscalePipeline", "KAttentionBlock"),
])
def test_unets_attending_in_blocks_merging_does_not_know_are_refused_naming_them(name: str, why: str) -> None:
    pipe = tiny_unet_variant(name)
    with pytest.raises(TypeError, match=f"got {name}, whose model is a UNet2DConditionModel with its attention in "
                                        f"{why} \\(blocks token merging does not know\\)"):
        apply_token_merging(pipe, TokenMergingConfig(ratio=0.5))
    assert why in merging_supports(pipe.unet) and merging_state(pipe) is None
    with pytest.raises(TypeError, match="got UNet2DConditionModel with its attention in"):
        remove_token_merging(pipe.unet)


def test_vq_diffusion_is_refused_before_any_call() -> None:
    # its Transformer2DModel holds BasicTransformerBlocks over VQ codebook ids: accepted, it ran every call unmerged
    pipe = tiny_unet_variant("VQDiffusionPipeline")
    with pytest.raises(TypeError, match="Transformer2DModel with num_vector_embeds .*VQDiffusionPipeline"):
        apply_token_merging(pipe, TokenMergingConfig(ratio=0.5))
    assert "num_vector_embeds" in merging_supports(pipe.transformer) and merging_state(pipe) is None
    torch.manual_seed(0)
    continuous = diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                              norm_num_groups=4, cross_attention_dim=16)
    assert merging_supports(continuous) is None  # the same class over a latent still merges


def test_a_model_without_attention_is_named_so() -> None:
    with pytest.raises(TypeError, match="got Linear with no attention module"):
        apply_token_merging(torch.nn.Linear(2, 2), TokenMergingConfig(ratio=0.5))


def test_the_unclip_prior_is_refused_before_any_call() -> None:
    # built of BasicTransformerBlocks over embeddings (no image grid): accepted, it warned "merged nothing" per call
    torch.manual_seed(0)
    prior = diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=16,
                                       num_embeddings=4, additional_embeddings=1)
    with pytest.raises(TypeError, match="does not support PriorTransformer .*not an image's token grid"):
        apply_token_merging(prior, TokenMergingConfig(ratio=0.5))
    assert "PriorTransformer" in merging_supports(prior) and merging_state(prior) is None
