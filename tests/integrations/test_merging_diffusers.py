"""Token merging on diffusers models: patch grids, attention masks, wrapper and video models."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

from tokensparse.integrations.merging_hooks import apply_token_merging, merging_state, remove_token_merging  # noqa: E402
from tokensparse.integrations.merging_spans import merge_key_mask  # noqa: E402
from tokensparse.merging import TokenMergingConfig, match  # noqa: E402

from .test_merging_hooks import _randomize  # noqa: E402


def _pixart() -> nn.Module:
    torch.manual_seed(0)
    return _randomize(diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=16,
        in_channels=4, out_channels=8, cross_attention_dim=16, norm_num_groups=4, use_additional_conditions=False,
    ), std=0.05)


def _sd3_controlnet() -> nn.Module:
    from diffusers.models.controlnets.controlnet_sd3 import SD3ControlNetModel

    torch.manual_seed(0)
    return _randomize(SD3ControlNetModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16), std=0.05)


def test_merge_key_mask_keeps_the_surviving_keys_and_refuses_what_would_change_attention() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 8, generator=g)
    is_dst = torch.zeros(9, dtype=torch.bool)
    is_dst[::2] = True
    m = match(x[:, 2:11], is_dst, num=3)  # a 9-token span at tokens 2..10, one token after it
    mask = torch.zeros(2, 1, 12)
    mask[:, 0, [0, 11]] = float("-inf")  # masked keys outside the span; the span itself all visible
    got = merge_key_mask(mask, m, (2, 9), 12)
    want = [torch.cat([mask[b, 0, :2], mask[b, 0, 2:11][m.keep[b]], mask[b, 0, 11:]]) for b in range(2)]
    assert got.shape == (2, 1, 12 - m.num_merged) and torch.equal(got[:, 0], torch.stack(want))
    assert torch.equal(merge_key_mask(mask[:1, 0], m, (2, 9), 12), got[:, 0])  # (1, n): shared by the batch
    crossing = mask.clone()
    crossing[0, 0, 2 + int(m.src[0, 0])] = float("-inf")  # a merged source masked, its destination visible
    assert merge_key_mask(crossing, m, (2, 9), 12) is None
    assert merge_key_mask(torch.zeros(2, 12, 12), m, (2, 9), 12) is None  # query x key: the queries merge too
    assert merge_key_mask(mask[..., :5], m, (2, 9), 12) is None and merge_key_mask(mask.repeat(3, 1, 1), m, (2, 9),
                                                                                  12) is None


@torch.no_grad()
def test_pixart_with_a_self_attention_mask_at_an_odd_latent_size(caplog: pytest.LogCaptureFixture) -> None:
    pix = _pixart()
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(2, 4, 13, 9, generator=g), torch.randn(2, 5, 16, generator=g)  # 2x2 patches: 6x4 tokens
    cond = {"resolution": None, "aspect_ratio": None}

    def run(mask: torch.Tensor | None) -> torch.Tensor:
        return pix(x, ehs, torch.tensor([500, 500]), attention_mask=mask, added_cond_kwargs=cond).sample

    visible, last_row_masked = torch.ones(2, 24), torch.ones(2, 24)
    last_row_masked[:, 20:] = 0
    dense = [run(visible), run(last_row_masked)]
    apply_token_merging(pix, TokenMergingConfig(ratio=0.5))
    masks = []
    pix.transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda m, a, k: masks.append(None if k["attention_mask"] is None else k["attention_mask"].shape),
        with_kwargs=True)
    merged = run(visible)
    assert masks == [(2, 1, 12)]  # 24 tokens, half merged: the mask (as a bias) follows them
    assert merging_state(pix).merged_tokens > 0 and not torch.equal(merged, dense[0])
    masks.clear()
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        out = run(last_row_masked)  # pairs across the masked row would change what attention sees
    assert torch.isfinite(out).all() and ("runs unmerged" in caplog.text) == (masks == [(2, 1, 24)])
    apply_token_merging(pix, TokenMergingConfig(ratio=0.5))  # fresh draws, as for `merged`
    assert torch.allclose(merged, run(None), atol=1e-5)  # an all-visible mask changes nothing
    apply_token_merging(pix, TokenMergingConfig(ratio=0.0))
    assert torch.equal(run(visible), dense[0]) and torch.equal(run(last_row_masked), dense[1])
    remove_token_merging(pix)
    assert torch.equal(run(visible), dense[0]) and torch.equal(run(last_row_masked), dense[1])


@torch.no_grad()
def test_a_wrapper_without_a_patch_size_uses_its_models_and_merges() -> None:
    from diffusers.models.controlnets.controlnet_sd3 import SD3MultiControlNetModel

    multi = SD3MultiControlNetModel([_sd3_controlnet()])
    g = torch.Generator().manual_seed(0)
    kw = {"hidden_states": torch.randn(2, 4, 10, 14, generator=g), "controlnet_cond": [torch.randn(2, 4, 10, 14)],
          "conditioning_scale": [1.0], "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
          "pooled_projections": torch.randn(2, 8, generator=g), "timestep": torch.tensor([500, 500])}
    dense = multi(**kw)
    apply_token_merging(multi, TokenMergingConfig(ratio=0.5))
    merged = multi(**kw)
    assert merging_state(multi).merged_tokens > 0 and not torch.equal(merged[0][0], dense[0][0])
    remove_token_merging(multi)
    assert torch.equal(multi(**kw)[0][0], dense[0][0])


@torch.no_grad()
def test_a_joint_text_image_key_mask_is_merged_with_the_tokens_unless_a_pair_crosses_it(
        caplog: pytest.LogCaptureFixture) -> None:
    # FLUX double-stream attention: keys [text, image], e.g. proportional Sparse Context's log-size bias
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    flux = _randomize(FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=0,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                             pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)), std=0.05)
    g = torch.Generator().manual_seed(0)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(6.0), torch.arange(6.0), indexing="ij"),
                          -1).reshape(-1, 3)
    kw = {"hidden_states": torch.randn(2, 36, 8, generator=g), "encoder_hidden_states": torch.randn(2, 5, 16),
          "pooled_projections": torch.randn(2, 8), "timestep": torch.tensor([0.5, 0.5]),
          "img_ids": img_ids, "txt_ids": torch.zeros(5, 3)}
    crossing = torch.ones(2, 1, 1, 41, dtype=torch.bool)
    crossing[..., 5::2] = False  # every other image token hidden: merged pairs cross the mask
    dense = flux(**kw, joint_attention_kwargs={"attention_mask": crossing}).sample
    apply_token_merging(flux, TokenMergingConfig(ratio=0.5, merge_mlp=False))
    plain = flux(**kw).sample
    apply_token_merging(flux, TokenMergingConfig(ratio=0.5, merge_mlp=False))  # afresh: the same matching
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        visible = flux(**kw, joint_attention_kwargs={"attention_mask": torch.ones(2, 1, 1, 41, dtype=torch.bool)})
        assert not caplog.text and merging_state(flux).merged_tokens > 0  # merged, its mask thinned along
        torch.testing.assert_close(visible.sample, plain, rtol=1e-5, atol=1e-6)
        out = flux(**kw, joint_attention_kwargs={"attention_mask": crossing}).sample
    assert "attention_mask of shape (2, 1, 1, 41)" in caplog.text and torch.equal(out, dense)  # attention only
    remove_token_merging(flux)


def test_a_model_with_video_modules_is_rejected() -> None:
    sparsectrl = diffusers.SparseControlNetModel(
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16, conditioning_embedding_out_channels=(8, 16),
        motion_max_seq_length=8, motion_num_attention_heads=2, in_channels=4, conditioning_channels=4,
        use_simplified_condition_embedding=True)
    with pytest.raises(TypeError, match="video"):
        apply_token_merging(sparsectrl, TokenMergingConfig(ratio=0.5))
    assert merging_state(sparsectrl) is None


def test_an_image_model_with_3d_in_a_part_name_is_not_taken_for_video() -> None:
    from diffusers import QwenImageTransformer2DModel

    layered = QwenImageTransformer2DModel(  # holds a QwenEmbedLayer3DRope: an image model all the same
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4), use_layer3d_rope=True)
    apply_token_merging(layered, TokenMergingConfig(ratio=0.5))  # merged: each target layer on its own grid
    assert merging_state(layered) is not None  # (test_merging_qwen_layered)
    remove_token_merging(layered)


@pytest.mark.parametrize("xl", [False, True])
def test_token_merging_on_real_stable_diffusion_pipelines(xl: bool) -> None:
    import numpy as np

    from tokensparse.integrations.diffusers_tiny_sd import sd_call_kwargs, tiny_stable_diffusion

    pipe = tiny_stable_diffusion(xl=xl)
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": ["a cat", "a dog"], "num_images_per_prompt": 2, "guidance_scale": 5.0}
    dense = pipe(**call, **sd_call_kwargs()).images
    depth = 2 if xl else 1  # SDXL's top level has no attention
    for cfg in (TokenMergingConfig(ratio=0.5, max_downsample=depth),  # tomesd's ToMe
                TokenMergingConfig(threshold=0.3, recompute_every=2, max_downsample=depth)):  # CA-ToMe
        apply_token_merging(pipe, cfg)
        merged = pipe(**call, **sd_call_kwargs()).images
        assert merging_state(pipe).merged_tokens > 0
        assert merged.shape == dense.shape == (4, 16, 16, 3) and np.isfinite(merged).all()
        assert not np.array_equal(merged, dense)
    remove_token_merging(pipe)
    assert np.array_equal(pipe(**call, **sd_call_kwargs()).images, dense)  # the exact pipeline again


@torch.no_grad()
def test_a_lora_on_flux_proj_mlp_merges_in_either_order_and_after_unloading() -> None:
    """FLUX.1's single-stream ``proj_mlp`` is a ``Linear``, which peft's LoRA replaces by a wrapper (and unloading
    replaces back): the merging follows the module at ``block.proj_mlp``."""
    lora_config = pytest.importorskip("peft").LoraConfig
    from .test_merging_hooks import _flux_inputs, _flux_models

    def flux(lora: bool = False) -> nn.Module:
        model = dict(_flux_models())["flux"]
        if lora:
            torch.manual_seed(1)
            model.add_adapter(lora_config(r=2, lora_alpha=2, target_modules=["proj_mlp"], init_lora_weights=False))
        return model

    kw, cfg = _flux_inputs("flux"), TokenMergingConfig(ratio=0.5)
    plain = apply_token_merging(flux(), cfg)(**kw).sample
    first = apply_token_merging(flux(lora=True), cfg)
    lora_then_merging = first(**kw).sample
    after = apply_token_merging(flux(), cfg)
    after(**kw)
    torch.manual_seed(1)
    after.add_adapter(lora_config(r=2, lora_alpha=2, target_modules=["proj_mlp"], init_lora_weights=False))
    assert torch.equal(after(**kw).sample, lora_then_merging)  # was: the LoRA term of the unmerged tokens added
    first.unload_lora()  # proj_mlp is the base Linear again
    assert torch.equal(first(**kw).sample, plain)  # was: proj_mlp unmerged, attn merged by an earlier call's matching
    for model in (first, after):
        remove_token_merging(model)
        assert not any(m._forward_pre_hooks for m in model.single_transformer_blocks.modules())
