"""Token merging on the variants of the pipelines it supports (img2img, inpainting, ControlNet, Control / Fill, PAG,
Redux, ...), tiny and random-weight (:func:`~tokensparse.integrations.diffusers_tiny_variants.tiny_variant`): each
merges at a ratio and at a cached threshold, two calls give one output, and removing merging gives the dense output
exactly. Also the variants that cannot be served, refused at apply time."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from tokensparse.context import SparseContextConfig  # noqa: E402
from tokensparse.integrations.diffusers import apply_sparse_context_diffusers  # noqa: E402
from tokensparse.integrations.diffusers_tiny import qwen_call_kwargs  # noqa: E402
from tokensparse.integrations.diffusers_tiny_variants import tiny_variant  # noqa: E402
from tokensparse.integrations.merging_hooks import (  # noqa: E402
    apply_token_merging,
    merging_state,
    merging_supports,
    remove_token_merging,
)
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from .merging_contract import ours  # noqa: E402


def _image(seed: int, h: int, w: int | None = None) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w or h, 3) * 255).astype("uint8"))


def _mask(size: int) -> Image.Image:
    return Image.fromarray((np.pad(np.ones((size // 2, size // 2)), size // 4) * 255).astype("uint8"))


def _base(size: int, steps: int = 3, **kw: Any) -> dict:
    return {"prompt": "a cat", "num_inference_steps": steps, "height": size, "width": size, "output_type": "np",
            "generator": torch.Generator().manual_seed(0), **kw}


def _edit(size: int, mask: bool = False, **kw: Any) -> dict:
    """An img2img / inpainting call: 4 steps at strength 0.75 (3 run)."""
    return {**_base(size, 4, **kw), "image": _image(0, size), "strength": 0.75, **({"mask_image": _mask(size)}
                                                                                    if mask else {})}


FLUX = {"max_sequence_length": 16}
ZIMAGE = {"max_sequence_length": 32, "guidance_scale": 2.0}
SD3 = {"guidance_scale": 4.0}
PIXART = {"use_resolution_binning": False, "max_sequence_length": 16}


def _qwen(steps: int = 3, **kw: Any) -> dict:
    return {**qwen_call_kwargs(steps=steps), "output_type": "np", "generator": torch.Generator().manual_seed(0), **kw}


def _no_size(call: dict) -> dict:
    return {k: v for k, v in call.items() if k not in ("height", "width")}


# pipeline class -> its call (fresh arguments each time); anything else the test needs goes in EXTRA
CALLS: dict[str, Callable[[], dict]] = {
    "FluxImg2ImgPipeline": lambda: _edit(32, **FLUX),
    "FluxInpaintPipeline": lambda: _edit(32, mask=True, **FLUX),
    "FluxControlPipeline": lambda: _base(32, control_image=_image(1, 32), **FLUX),
    "FluxControlImg2ImgPipeline": lambda: _edit(32, control_image=_image(1, 32), **FLUX),
    "FluxControlInpaintPipeline": lambda: _edit(32, mask=True, control_image=_image(1, 32), **FLUX),
    "FluxFillPipeline": lambda: _base(32, image=_image(0, 32), mask_image=_mask(32), **FLUX),
    "FluxControlNetPipeline": lambda: _base(32, control_image=_image(1, 32), **FLUX),
    "FluxControlNetImg2ImgPipeline": lambda: _edit(32, control_image=_image(1, 32), **FLUX),
    "FluxControlNetInpaintPipeline": lambda: _edit(32, mask=True, control_image=_image(1, 32), **FLUX),
    "FluxKontextInpaintPipeline": lambda: _base(32, image=_image(0, 32), mask_image=_mask(32), strength=1.0,
                                                image_reference=_image(2, 32), _auto_resize=False, max_area=32 * 32,
                                                **FLUX),
    "ChromaImg2ImgPipeline": lambda: _edit(32, **FLUX),
    "ChromaInpaintPipeline": lambda: _edit(32, mask=True, **FLUX),
    "Flux2KleinInpaintPipeline": lambda: _edit(32, mask=True, **FLUX),
    "Flux2Pipeline": lambda: {**_base(32), "prompt": None,
                              "prompt_embeds": torch.randn(1, 8, 48, generator=torch.Generator().manual_seed(1))},
    "ZImageImg2ImgPipeline": lambda: _edit(32, **ZIMAGE),
    "ZImageInpaintPipeline": lambda: _edit(32, mask=True, **ZIMAGE),
    "ZImageControlNetPipeline": lambda: _base(32, control_image=_image(1, 32), **ZIMAGE),
    "ZImageControlNetInpaintPipeline": lambda: _base(32, image=_image(0, 32), mask_image=_mask(32),
                                                     control_image=_image(1, 32), **ZIMAGE),
    "CogView4ControlPipeline": lambda: {**_base(32, guidance_scale=4.0), "width": 48, "control_image": _image(1, 32)},
    "StableDiffusion3Pipeline": lambda: _base(32, **SD3),
    "StableDiffusion3Img2ImgPipeline": lambda: _edit(32, **SD3),
    "StableDiffusion3InpaintPipeline": lambda: _edit(32, mask=True, **SD3),
    "StableDiffusion3ControlNetPipeline": lambda: _base(32, control_image=_image(1, 32), **SD3),
    "StableDiffusion3ControlNetInpaintingPipeline": lambda: _base(32, control_image=_image(0, 32),
                                                                  control_mask=_mask(32), **SD3),
    "StableDiffusion3PAGPipeline": lambda: _base(32, pag_scale=2.0, **SD3),
    "StableDiffusion3PAGImg2ImgPipeline": lambda: _edit(32, pag_scale=2.0, **SD3),
    "PixArtAlphaPipeline": lambda: _base(32, **PIXART),
    "PixArtSigmaPipeline": lambda: _base(32, **PIXART),
    "PixArtSigmaPAGPipeline": lambda: _base(32, pag_scale=2.0, **PIXART),
    "DiTPipeline": lambda: {"class_labels": [0], "num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "np",
                            "generator": torch.Generator().manual_seed(0)},
    "QwenImagePipeline": lambda: _qwen(),
    "QwenImageImg2ImgPipeline": lambda: _qwen(4, image=_image(0, 32), strength=0.75),
    "QwenImageInpaintPipeline": lambda: _qwen(4, image=_image(0, 32), mask_image=_mask(32), strength=0.75),
    "QwenImageControlNetPipeline": lambda: _qwen(control_image=_image(1, 32)),
    "QwenImageControlNetInpaintPipeline": lambda: _qwen(control_image=_image(0, 32), control_mask=_mask(32)),
    "QwenImageEditPipeline": lambda: _qwen(image=_image(0, 32)),
    "LongCatImagePipeline": lambda: _base(32, guidance_scale=2.0, enable_prompt_rewrite=False),
    "StableDiffusionImg2ImgPipeline": lambda: _edit(16),
    "StableDiffusionInpaintPipeline": lambda: _base(16, image=_image(0, 16), mask_image=_mask(16)),
    "StableDiffusionControlNetPipeline": lambda: _base(16, image=_image(1, 16)),
    "StableDiffusionControlNetImg2ImgPipeline": lambda: _edit(16, control_image=_image(1, 16)),
    "StableDiffusionControlNetInpaintPipeline": lambda: _edit(16, mask=True, control_image=_image(1, 16)),
    "StableDiffusionControlNetXSPipeline": lambda: _base(16, image=_image(1, 16)),
    "StableDiffusionPAGPipeline": lambda: _base(16, pag_scale=2.0),
    "StableDiffusionPAGImg2ImgPipeline": lambda: _no_size(_edit(16, pag_scale=2.0)),
    "StableDiffusionPAGInpaintPipeline": lambda: _edit(16, mask=True, pag_scale=2.0),
    "StableDiffusionControlNetPAGPipeline": lambda: _base(16, image=_image(1, 16), pag_scale=2.0),
    "StableDiffusionInstructPix2PixPipeline": lambda: _no_size(_base(16, image=_image(0, 16))),
    "StableDiffusionAdapterPipeline": lambda: _base(16, image=_image(1, 16)),
    "LatentConsistencyModelPipeline": lambda: _base(16),
    "LatentConsistencyModelImg2ImgPipeline": lambda: _edit(16),
    "StableDiffusionXLImg2ImgPipeline": lambda: _edit(16),
    "StableDiffusionXLInpaintPipeline": lambda: _edit(16, mask=True),
    "StableDiffusionXLControlNetPipeline": lambda: _base(16, image=_image(1, 16)),
    "StableDiffusionXLControlNetInpaintPipeline": lambda: _edit(16, mask=True, control_image=_image(1, 16)),
    "StableDiffusionXLControlNetUnionPipeline": lambda: _base(16, control_image=[_image(1, 16)], control_mode=[0]),
    "StableDiffusionXLPAGPipeline": lambda: _base(16, pag_scale=2.0),
    "StableDiffusionXLPAGImg2ImgPipeline": lambda: _no_size(_edit(16, pag_scale=2.0)),
    "StableDiffusionXLInstructPix2PixPipeline": lambda: _no_size(_base(16, image=_image(0, 16))),
    "StableDiffusionXLAdapterPipeline": lambda: _base(16, image=_image(1, 16)),
    "StableDiffusionXLControlNetImg2ImgPipeline": lambda: _edit(16, control_image=_image(1, 16)),
    "StableDiffusionXLControlNetUnionImg2ImgPipeline": lambda: _edit(16, control_image=[_image(1, 16)],
                                                                     control_mode=[0]),
    "StableDiffusionXLControlNetUnionInpaintPipeline": lambda: _edit(16, mask=True, control_image=[_image(1, 16)],
                                                                     control_mode=[0]),
    "StableDiffusionXLControlNetXSPipeline": lambda: _base(16, image=_image(1, 16)),
    "StableDiffusionXLPAGInpaintPipeline": lambda: _edit(16, mask=True, pag_scale=2.0),
    "StableDiffusionXLControlNetPAGPipeline": lambda: _base(16, image=_image(1, 16), pag_scale=2.0),
    "StableDiffusionXLControlNetPAGImg2ImgPipeline": lambda: _edit(16, control_image=_image(1, 16), pag_scale=2.0),
    "StableDiffusionControlNetPAGInpaintPipeline": lambda: _edit(16, mask=True, control_image=_image(1, 16),
                                                                 pag_scale=2.0),
    "StableDiffusionPanoramaPipeline": lambda: {**_base(16), "width": 32, "view_batch_size": 1},
    "StableDiffusionLDM3DPipeline": lambda: _base(16),
}
@pytest.fixture
def small_qwen_edit(monkeypatch: pytest.MonkeyPatch) -> None:
    """``QwenImageEditPipeline`` sizes its output from ``calculate_dimensions(1024 * 1024, ratio)``: 32x32 here."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as module

    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: (32, 32, None))


def _run(pipe: Any, call: Callable[[], dict]) -> np.ndarray:
    torch.manual_seed(0)  # CogView4ControlPipeline samples the control image's latents without the generator
    return pipe(**call())[0]  # images; AudioLDM's audios, Marigold's predictions


def merges_deterministically_and_removes_exactly(pipe: Any, call: Callable[[], dict], caplog: pytest.LogCaptureFixture,
                                                 **cfg: Any) -> None:
    """``pipe(**call())`` merges at ratio 0.5 and at a threshold recomputed every 3rd step (``cfg``: more settings):
    finite images of the dense shape, unlike them, the same on a second call, with nothing left unmerged; removing
    merging gives the dense images exactly."""
    pipe.set_progress_bar_config(disable=True)
    dense = _run(pipe, call)
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        for config in (TokenMergingConfig(ratio=0.5, **cfg), TokenMergingConfig(threshold=0.3, recompute_every=3,
                                                                                 **cfg)):
            apply_token_merging(pipe, config)
            merged = _run(pipe, call)
            assert merging_state(pipe).merged_tokens > 0, config
            assert merged.shape == dense.shape and np.isfinite(merged).all() and not np.array_equal(merged, dense)
            assert np.array_equal(_run(pipe, call), merged), config  # a second generation: the same images
    assert not ours(caplog)  # no attention mask refused, no call left unmerged
    remove_token_merging(pipe)
    assert np.array_equal(_run(pipe, call), dense)


@pytest.mark.parametrize("name", list(CALLS))
def test_variant_merges_deterministically_and_removes_exactly(name: str, caplog: pytest.LogCaptureFixture,
                                                              small_qwen_edit: None) -> None:
    merges_deterministically_and_removes_exactly(tiny_variant(name), CALLS[name], caplog,
                                                 max_downsample=2 if "XL" in name else 1)


def test_flux_pipeline_with_redux_embeddings(caplog: pytest.LogCaptureFixture) -> None:
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    flux = tiny_variant("FluxPipeline")
    encoders = {k: v for k, v in flux.components.items() if k.startswith(("text_encoder", "tokenizer"))}
    torch.manual_seed(0)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=32, patch_size=8)).eval()
    redux = diffusers.FluxPriorReduxPipeline(
        image_encoder=siglip, feature_extractor=SiglipImageProcessorPil(size={"height": 32, "width": 32}),
        image_embedder=ReduxImageEncoder(redux_dim=16, txt_in_features=16).eval(), **encoders)
    embeds = redux(_image(3, 32), prompt="a cat")  # T5 prompt tokens, then 16 image tokens
    pipe = diffusers.FluxPipeline(**{**flux.components, **dict.fromkeys(encoders)})
    merges_deterministically_and_removes_exactly(pipe, lambda: {
        **_base(32), "prompt": None, "prompt_embeds": embeds.prompt_embeds,
        "pooled_prompt_embeds": embeds.pooled_prompt_embeds}, caplog)


def _tokens(module: torch.nn.Module, run: Callable[[], Any], models: dict[str, torch.nn.Module]) -> list[tuple]:
    """(which of ``models`` was running, tokens ``module`` saw) for each call of ``module`` in ``run()``."""
    running, seen = [None], []
    handles = [m.register_forward_pre_hook(lambda mod, a, key=key: running.__setitem__(0, key))
               for key, m in models.items()]
    handles.append(module.register_forward_pre_hook(  # after merging's hooks: sees the merged tokens
        lambda mod, a, k: seen.append((running[0], k.get("hidden_states", a[0] if a else None).shape[1])),
        with_kwargs=True))
    run()
    for h in handles:
        h.remove()
    return seen


def test_zimage_controlnet_runs_the_transformers_blocks_it_shares_unmerged() -> None:
    # ZImageControlNetModel.from_transformer shares the transformer's noise refiner: its calls there (before the
    # transformer's in each step) used to merge with the transformer's last grid, matchings and step (an output
    # that depended on the previous generation)
    pipe = tiny_variant("ZImageControlNetPipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.controlnet.noise_refiner is pipe.transformer.noise_refiner
    apply_token_merging(pipe, TokenMergingConfig(ratio=0.5))
    models = {"controlnet": pipe.controlnet, "transformer": pipe.transformer}
    for _ in range(2):
        seen = _tokens(pipe.transformer.noise_refiner[0].attention,
                       lambda: pipe(**CALLS["ZImageControlNetPipeline"]()), models)
        assert seen == [("controlnet", 64), ("transformer", 32)] * 3  # 8x8 image tokens; 3 steps
    remove_token_merging(pipe)


def _visualcloze_call() -> dict:
    rows: list[list[Image.Image | None]] = [[_image(2 * r + c, 32) for c in range(2)] for r in range(3)]
    rows[-1][-1] = None  # the target
    return {"task_prompt": "make it red", "content_prompt": "a cat", "image": rows, "num_inference_steps": 3,
            "max_sequence_length": 16, "output_type": "np", "generator": torch.Generator().manual_seed(0)}


def test_visualcloze_merges_its_query_row_and_stacks_with_sparse_context(caplog: pytest.LogCaptureFixture) -> None:
    # its ids number the rows of its image grid from 1 (no token 0), the query row (with the target) last: merging
    # took the first in-context example row for the target
    from tokensparse.integrations.diffusers_tiny_visualcloze import tiny_visualcloze

    pipe = tiny_visualcloze(seed=0)
    merges_deterministically_and_removes_exactly(pipe, _visualcloze_call, caplog)
    apply_token_merging(pipe, TokenMergingConfig(ratio=0.5))
    attn, row = pipe.transformer.transformer_blocks[0].attn, 8 * 16  # a row: two 32x32 images, 8x16 tokens
    for examples in (2 * row, 2 * row // 4):  # then Sparse Context thins the example rows to a quarter
        seen: list[torch.Tensor] = []  # the image tokens attention gets, before merging and after
        handles = [attn.register_forward_pre_hook(lambda m, a, k, seen=seen: seen.append(k["hidden_states"]),
                                                  with_kwargs=True, prepend=prepend) for prepend in (True, False)]
        pipe(**_visualcloze_call())
        for h in handles:
            h.remove()
        for before, after in zip(seen[::2], seen[1::2]):
            assert before.shape[1] == examples + row and after.shape[1] == examples + row // 2
            assert torch.equal(after[:, :examples], before[:, :examples])  # the example rows pass as they are
        apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))


@pytest.mark.slow
def test_visualcloze_pipeline_with_its_upsampling_stage(caplog: pytest.LogCaptureFixture) -> None:
    from tokensparse.integrations.diffusers_tiny_visualcloze import tiny_visualcloze

    pipe = tiny_visualcloze(seed=0, combined=True)  # its upsampling stage: FluxFillPipeline on the target alone
    for stage in (pipe.generation_pipe, pipe.upsampling_pipe):
        stage.set_progress_bar_config(disable=True)
    merges_deterministically_and_removes_exactly(
        pipe, lambda: {**_visualcloze_call(), "upsampling_height": 32, "upsampling_width": 32}, caplog)


def test_models_and_pipeline_settings_merging_cannot_serve_are_refused_before_anything_changes() -> None:
    uvit = diffusers.UVit2DModel(  # aMUSEd: BasicTransformerBlocks over token ids, no latent to find a grid in
        hidden_size=32, cond_embed_dim=16, micro_cond_encode_dim=2, micro_cond_embed_dim=10, encoder_hidden_size=16,
        vocab_size=32, codebook_size=32, in_channels=8, block_out_channels=8, num_res_blocks=1, block_num_heads=1,
        num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    with pytest.raises(TypeError, match="UVit2DModel.forward takes neither"):
        apply_token_merging(uvit, TokenMergingConfig(ratio=0.5))
    assert "takes neither" in merging_supports(uvit) and merging_state(uvit) is None  # the CLI's pre-flight too

    sag = tiny_variant("StableDiffusionSAGPipeline")  # reads the UNet mid block's self-attention map (here at /2)
    apply_token_merging(sag, TokenMergingConfig(ratio=0.5))  # the top level only: the map stays whole
    with pytest.raises(ValueError, match=r"cfg.max_downsample=2 .* use max_downsample < 2"):
        apply_token_merging(sag, TokenMergingConfig(ratio=0.5, max_downsample=2))
    assert merging_state(sag).cfg.max_downsample == 1  # the failed apply left the earlier one in place
    apply_token_merging(sag, TokenMergingConfig(ratio=0.5, max_downsample=2, merge_attn=False))  # the MLPs only
    remove_token_merging(sag)

    excite = tiny_variant("StableDiffusionAttendAndExcitePipeline")  # reads the cross-attention maps
    with pytest.raises(ValueError, match="cfg.merge_cross=True"):
        apply_token_merging(excite, TokenMergingConfig(ratio=0.5, merge_cross=True))
    assert merging_state(excite) is None
    apply_token_merging(excite, TokenMergingConfig(ratio=0.0, merge_cross=True))  # the identity merges nothing
    remove_token_merging(excite)
