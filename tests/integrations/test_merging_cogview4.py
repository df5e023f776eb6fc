"""Token merging on CogView4 (``CogView4Transformer2DModel``, ``CogView4Pipeline``): the image stream merges in every
block's attention (with its RoPE rows) and in the image call of its feed-forward; the text stream never."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_cogview4")

from tokensparse.integrations.diffusers_tiny_cogview4 import tiny_cogview4  # noqa: E402
from tokensparse.integrations.merging_hooks import apply_token_merging, merging_state, remove_token_merging  # noqa: E402
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from . import merging_contract as contract  # noqa: E402


def _transformer() -> nn.Module:
    return tiny_cogview4(seed=0).transformer  # 2 blocks; dim 32, patch 2


def _inputs(batch: int = 2, h: int = 12, w: int = 20, smooth: bool = False, seed: int = 0) -> dict:
    """Latents ``(B, 4, h, w)`` (``h/2 x w/2`` tokens: 6x10 = 60) and 64 text tokens (more than the image's: the
    feed-forward's text call must not merge, although its first 60 tokens would fit the grid)."""
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 4, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    else:
        x = torch.randn(batch, 4, h, w, generator=g)
    size = torch.tensor([[8.0 * h, 8.0 * w]]).repeat(batch, 1)
    return {"hidden_states": x, "encoder_hidden_states": torch.randn(batch, 64, 16, generator=g),
            "timestep": torch.full((batch,), 700.0), "original_size": size, "target_size": size,
            "crop_coords": torch.zeros(batch, 2), "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _token_counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    """Tokens each sublayer of each block saw in one call (the feed-forward: its image call, then its text call)."""
    return contract.tokens_seen([(key, sub) for blk in model.transformer_blocks for key, sub in (("attn1", blk.attn1),
                                                                                         ("ff", blk.ff))],
                       lambda: _run(model, kw))


def _attention_kwargs(model: nn.Module, kw: dict) -> dict:
    return contract.call_kwargs(model.transformer_blocks[0].attn1, lambda: _run(model, kw))


def test_cogview4_merges_the_image_stream_only_and_removes_exactly() -> None:
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    unmerged = _token_counts(model, kw)
    assert unmerged == {"attn1": [60, 60], "ff": [60, 64, 60, 64]}
    dense_cos, dense_sin = _attention_kwargs(model, kw)["image_rotary_emb"]
    assert dense_cos.shape == (60, 16)  # one table for the batch
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    seen = _token_counts(model, kw)
    assert seen == {"attn1": [30, 30], "ff": [30, 64, 30, 64]}  # the text stream (64 tokens) passes whole
    assert merging_state(model).merged_tokens == 2 * 30
    attn = _attention_kwargs(model, kw)
    assert attn["encoder_hidden_states"].shape == (2, 64, 32)
    cos, sin = attn["image_rotary_emb"]
    assert cos.shape == sin.shape == (30, 16)
    rows = [next(j for j in range(60) if torch.equal(dense_cos[j], r) and torch.equal(dense_sin[j], s))
            for r, s in zip(cos, sin)]
    assert rows == sorted(set(rows)), rows  # each kept token keeps its own RoPE row, in order

    def ff_only(counts: dict[str, list[int]]) -> None:
        assert counts == {"attn1": [60, 60], "ff": [30, 64, 30, 64]}

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _token_counts(model, kw),
                                         unmerged, ff_only, reapply=True)


def test_cogview4_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_cogview4_batch_of_two_shares_one_matching() -> None:
    # the RoPE table has no batch axis: one matching, from the batch's mean tokens, serves both samples; it does not
    # depend on their order, so swapping the samples swaps the outputs
    model, kw = _transformer(), _inputs()
    swapped = {k: v.flip(0) if isinstance(v, Tensor) else v for k, v in kw.items()}
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    both = _run(model, kw)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))  # afresh: the same destination draw
    torch.testing.assert_close(_run(model, swapped).flip(0), both, rtol=1e-4, atol=1e-5)
    # (per-sample matchings would pass the swap too:) the two samples get one matching, and two copies of one sample
    # merge as it alone would
    contract.batch_shares_one_matching(model, model.transformer_blocks[0].attn1, lambda k: _run(model, k), kw)


def _pipe_call() -> dict:
    return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 32, "width": 48, "num_inference_steps": 3,
            "guidance_scale": 4.0, "output_type": "np", "generator": torch.Generator().manual_seed(0)}


def test_cogview4_pipeline_generations() -> None:
    contract.pipeline_generations(tiny_cogview4(seed=0), _pipe_call, (2, 32, 48, 3))


def test_cli_generate_merges_on_a_cogview4_pipeline(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    contract.cli_generate_merges(tmp_path, caplog, tiny_cogview4(seed=0), "cogview4", "CogView4Pipeline")


def test_cogview4_feed_forward_alone_never_merges_a_text_stream_as_long_as_the_grid() -> None:
    # merge_attn=False: the feed-forward owns the matching; its second call (the text stream) must not be read as a
    # fresh image call, even where the text has exactly as many tokens as the grid (60 = 6x10)
    model, kw = _transformer(), _inputs()
    kw["encoder_hidden_states"] = kw["encoder_hidden_states"][:, :60]
    unmerged = _token_counts(model, kw)
    assert unmerged == {"attn1": [60, 60], "ff": [60, 60, 60, 60]}
    apply_token_merging(model, TokenMergingConfig(ratio=0.5, merge_attn=False))
    assert _token_counts(model, kw) == {"attn1": [60, 60], "ff": [30, 60, 30, 60]}
    assert merging_state(model).merged_tokens == 2 * 30
    remove_token_merging(model)
