"""Token merging on Sana (``SanaTransformer2DModel``, ``SanaPipeline``): the image tokens merge in every block's linear
self-attention, its cross-attention's queries (``merge_cross``) and the pointwise convolutions of its mix-FFN; the
depthwise convolution between them sees the whole grid, and the caption is never merged."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.sana_transformer")

from tokensparse.integrations.diffusers_tiny_sana import tiny_sana  # noqa: E402
from tokensparse.integrations.merging_hooks import (  # noqa: E402
    apply_token_merging,
    merging_state,
    merging_supports,
    remove_token_merging,
)
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from . import merging_contract as contract  # noqa: E402

N = 60  # image tokens of _inputs: a 6x10 grid (patch 1)


def _transformer() -> nn.Module:
    return tiny_sana(seed=0).transformer  # 2 blocks; dim 32, patch 1


def _inputs(batch: int = 2, h: int = 6, w: int = 10, smooth: bool = False, seed: int = 0) -> dict:
    """Latents ``(B, 4, h, w)`` (``h x w`` tokens: 6x10 = 60) and 64 caption tokens, the last 20 of the second
    sample masked."""
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 4, 3, 5, generator=g), size=(h, w), mode="bilinear")
    else:
        x = torch.randn(batch, 4, h, w, generator=g)
    mask = torch.ones(batch, 64, dtype=torch.long)
    mask[-1, 44:] = 0
    return {"hidden_states": x, "encoder_hidden_states": torch.randn(batch, 64, 16, generator=g),
            "encoder_attention_mask": mask, "timestep": torch.full((batch,), 700.0), "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _token_counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    """Tokens each sublayer of each block saw in one call (the convolutions: the positions of their input map)."""
    seen: dict[str, list[int]] = {}

    def count(key: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        seen.setdefault(key, []).append(x.shape[1] if x.dim() == 3 else x.shape[-2] * x.shape[-1])

    handles = [sub.register_forward_pre_hook(lambda m, a, k, key=key: count(key, m, a, k), with_kwargs=True)
               for blk in model.transformer_blocks
               for key, sub in (("attn1", blk.attn1), ("attn2", blk.attn2), ("conv_inverted", blk.ff.conv_inverted),
                                ("conv_depth", blk.ff.conv_depth), ("conv_point", blk.ff.conv_point))]
    _run(model, kw)
    for h in handles:
        h.remove()
    return seen


def _counts(attn1: int, attn2: int, convs: int) -> dict[str, list[int]]:
    return {"attn1": [attn1] * 2, "attn2": [attn2] * 2, "conv_inverted": [convs] * 2, "conv_depth": [N] * 2,
            "conv_point": [convs] * 2}


def test_sana_merges_the_image_tokens_and_removes_exactly() -> None:
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    unmerged = _token_counts(model, kw)
    assert unmerged == _counts(N, N, N)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    assert _token_counts(model, kw) == _counts(30, N, 30)  # the depthwise convolution sees the whole grid
    assert merging_state(model).merged_tokens == 2 * 30
    cross = contract.call_kwargs(model.transformer_blocks[0].attn2, lambda: _run(model, kw))
    assert cross["encoder_hidden_states"].shape == (2, 64, 32)  # the caption is never merged

    def ff_only(counts: dict[str, list[int]]) -> None:
        assert counts == _counts(N, N, 30)

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _token_counts(model, kw),
                                         unmerged, ff_only, reapply=True)


def test_sana_cross_attention_merges_its_queries_only_and_alone() -> None:
    # merge_cross: attn2's queries merge, its caption keys and their mask (over the caption) pass whole; with
    # merge_attn=False and merge_mlp=False it is the one merged sublayer (accepted, as for PixArt)
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5, merge_cross=True))
    assert _token_counts(model, kw) == _counts(30, 30, 30)
    cross = contract.call_kwargs(model.transformer_blocks[0].attn2, lambda: _run(model, kw))
    assert cross["encoder_hidden_states"].shape == (2, 64, 32)
    assert cross["attention_mask"].shape == (2, 1, 64)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5, merge_attn=False, merge_mlp=False, merge_cross=True))
    assert _token_counts(model, kw) == _counts(N, 30, N)
    merged = _run(model, kw)
    assert torch.isfinite(merged).all() and not torch.equal(merged, dense)
    remove_token_merging(model)
    assert torch.equal(_run(model, kw), dense)


def test_sana_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_sana_batch_samples_merge_as_each_alone() -> None:
    # no positional table: each sample gets its own matching
    model, kw = _transformer(), _inputs()
    contract.batch_matches_each_sample_alone(
        model, lambda: _run(model, kw),
        lambda i: _run(model, {k: v[i:i + 1] if isinstance(v, Tensor) else v for k, v in kw.items()}))


def test_sana_is_supported_and_its_video_model_refused() -> None:
    from diffusers import SanaVideoTransformer3DModel

    assert merging_supports(_transformer()) is None
    with torch.device("meta"):
        video = SanaVideoTransformer3DModel()
    assert "SanaVideoTransformer3DModel" in merging_supports(video)


def _pipe_call() -> dict:
    return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 32, "width": 64, "num_inference_steps": 3,
            "guidance_scale": 4.5, "output_type": "np", "use_resolution_binning": False,
            "complex_human_instruction": None, "generator": torch.Generator().manual_seed(0)}


def test_sana_pipeline_generations(caplog: pytest.LogCaptureFixture) -> None:
    contract.pipeline_generations(tiny_sana(seed=0), _pipe_call, (2, 32, 64, 3), caplog)


def test_sana_pipeline_reuses_matchings_between_recompute_steps(caplog: pytest.LogCaptureFixture) -> None:
    # hits: step 1 reuses step 0's matchings, in each of the 2 blocks; merged: 3 steps x 2 blocks x half of the
    # 16x32 grid (CFG: one call)
    contract.pipeline_reuses_matchings(tiny_sana(seed=0), _pipe_call, 2, 3 * 2 * 256, caplog)


def test_sana_lora_on_the_pointwise_convolutions_merges_in_either_order_and_after_unloading() -> None:
    """The mix-FFN's pointwise convolutions are ``Conv2d``s, which peft's LoRA replaces by a wrapper (and unloading
    replaces back): the merging follows the module at ``block.ff.conv_inverted`` / ``block.ff.conv_point``."""
    cfg = TokenMergingConfig(ratio=0.5, merge_attn=False)  # the first convolution finds the matching
    contract.lora_follows_replaced_modules(_transformer, ["conv_inverted", "conv_point"], lambda m: _run(m, _inputs()),
                                           cfg, lambda m: m.transformer_blocks)
