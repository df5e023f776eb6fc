"""The per-block merging machinery (:mod:`tokensparse.integrations.merging_core`) against other hooks on the same
sublayers: diffusers' caches that hand back a sublayer's output of an earlier step are refused, block-level ones
stack."""

from __future__ import annotations

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

from tokensparse.integrations.merging_hooks import apply_token_merging, merging_state, remove_token_merging  # noqa: E402
from tokensparse.merging import TokenMergingConfig  # noqa: E402

H = W = 6  # a 6x6 grid of image tokens


def _flux() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()


def _inputs(t: float) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(H, W, 3)
    ids[..., 1], ids[..., 2] = torch.arange(H)[:, None], torch.arange(W)[None, :]
    return {"hidden_states": torch.randn(1, H * W, 8, generator=g), "encoder_hidden_states": torch.randn(1, 4, 16,
                                                                                                         generator=g),
            "pooled_projections": torch.randn(1, 8, generator=g), "timestep": torch.tensor([t]),
            "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(4, 3), "return_dict": False}


@torch.no_grad()
def _generate(model: nn.Module) -> list[torch.Tensor]:
    """Three steps of a bare loop (falling timesteps: one generation), in the cache context diffusers' caches read."""
    with model.cache_context("cond"):
        return [model(**_inputs(t))[0] for t in (0.9, 0.6, 0.3)]


def test_diffusers_caches_reusing_a_merged_sublayers_output_are_refused() -> None:
    # Pyramid Attention Broadcast / TaylorSeer hand back (or extrapolate from) an attention's output of an earlier
    # step: under merging, that step's merged tokens, which this step's matching unmerged into the wrong tokens
    # (silently at a ratio; a threshold merging another count failed deep inside the block)
    model = _flux()
    merged = _generate(apply_token_merging(model, TokenMergingConfig(threshold=0.2)))
    pab = diffusers.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                    spatial_attention_timestep_skip_range=(-1, 2000),
                                                    current_timestep_callback=lambda: 500)
    model.enable_cache(pab)  # after apply: refused at the call, before anything runs
    with pytest.raises(ValueError, match=r"PyramidAttentionBroadcastHook on transformer_blocks\.0\.attn.*disable_"):
        _generate(model)
    with pytest.raises(ValueError, match="PyramidAttentionBroadcastHook on single_transformer_blocks.0.attn"):
        apply_token_merging(model, TokenMergingConfig(ratio=0.5))  # before apply: refused there
    assert merging_state(model).cfg.threshold == 0.2  # the failed apply left the earlier one in place
    apply_token_merging(model, TokenMergingConfig(ratio=0.5, merge_attn=False))  # the MLPs carry no cache: fine
    assert all(torch.isfinite(x).all() for x in _generate(model)) and merging_state(model).merged_tokens > 0
    model.disable_cache()
    apply_token_merging(model, TokenMergingConfig(threshold=0.2))
    assert all(torch.equal(a, b) for a, b in zip(_generate(model), merged))
    model.enable_cache(diffusers.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1))
    with pytest.raises(ValueError, match="TaylorSeerCacheHook on"):
        _generate(model)
    model.disable_cache()
    remove_token_merging(model)


def test_a_block_level_diffusers_cache_stacks_with_merging() -> None:
    model = _flux()
    model.enable_cache(diffusers.FirstBlockCacheConfig(threshold=0.5))  # caches whole blocks' (unmerged) outputs
    apply_token_merging(model, TokenMergingConfig(threshold=0.2))
    assert all(torch.isfinite(x).all() for x in _generate(model)) and merging_state(model).merged_tokens > 0
    remove_token_merging(model)
    model.disable_cache()


def test_smoothed_energy_guidance_on_a_merged_attention_is_refused() -> None:
    # a modular pipeline's SEG guider hooks an attention's to_q for its pass and blurs the queries as a square grid of
    # the sequence: under merging they are fewer and out of grid order, so the blur mixed unrelated tokens silently
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceHook

    model = _flux()
    merged = _generate(apply_token_merging(model, TokenMergingConfig(ratio=0.5)))
    registry = HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0].attn.to_q)
    registry.register_hook(SmoothedEnergyGuidanceHook(blur_sigma=1.0), "seg")  # as the guider does for its pass
    with pytest.raises(ValueError, match=r"Smoothed Energy Guidance \(SmoothedEnergyGuidanceHook on "
                                         r"transformer_blocks\.0\.attn\.to_q\)"):
        _generate(model)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5, merge_attn=False))  # its attention runs unmerged: fine
    assert all(torch.isfinite(x).all() for x in _generate(model))
    registry.remove_hook("seg")  # the guider's cleanup after its pass
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    assert all(torch.equal(a, b) for a, b in zip(_generate(model), merged))
    remove_token_merging(model)
