"""Token merging on CogView3-Plus (``CogView3PlusTransformer2DModel``, ``CogView3PlusPipeline``): every block's image
stream merges in its attention and the image span, after the text, of its feed-forward's one call on ``[text,
image]``; the text is never merged, and each sample of a batch gets its own matching."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_cogview3plus")

from tokensparse.integrations.diffusers_tiny_cogview3plus import tiny_cogview3plus  # noqa: E402
from tokensparse.integrations.merging_hooks import (  # noqa: E402
    apply_token_merging,
    merging_state,
    merging_supports,
    remove_token_merging,
)
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from . import merging_contract as contract  # noqa: E402

N, T = 60, 12  # image tokens of _inputs (a 6x10 grid: latents 12x20, patch 2) and caption tokens


def _transformer() -> nn.Module:
    return tiny_cogview3plus(seed=0).transformer  # 2 blocks; dim 32, patch 2


def _inputs(batch: int = 2, h: int = 12, w: int = 20, smooth: bool = False, seed: int = 0) -> dict:
    """Latents ``(B, 4, h, w)`` (``h/2 x w/2`` tokens: 6x10 = 60), ``T`` caption tokens and the size conditions."""
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 4, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    else:
        x = torch.randn(batch, 4, h, w, generator=g)
    size = torch.tensor([[8.0 * h, 8.0 * w]]).repeat(batch, 1)
    return {"hidden_states": x, "encoder_hidden_states": torch.randn(batch, T, 16, generator=g),
            "timestep": torch.full((batch,), 700.0), "original_size": size, "target_size": size,
            "crop_coords": torch.zeros(batch, 2), "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _token_counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    subs = [(key, getattr(blk, key)) for blk in model.transformer_blocks for key in ("attn1", "ff")]
    return contract.tokens_seen(subs, lambda: _run(model, kw))


def test_cogview3plus_merges_the_image_tokens_only_and_removes_exactly() -> None:
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    unmerged = _token_counts(model, kw)
    assert unmerged == {"attn1": [N] * 2, "ff": [T + N] * 2}
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    assert _token_counts(model, kw) == {"attn1": [N // 2] * 2, "ff": [T + N // 2] * 2}
    assert merging_state(model).merged_tokens == 2 * N // 2
    cross = contract.call_kwargs(model.transformer_blocks[0].attn1, lambda: _run(model, kw))
    assert cross["encoder_hidden_states"].shape == (2, T, 32)  # the text stream is never merged

    def ff_only(counts: dict[str, list[int]]) -> None:
        assert counts == {"attn1": [N] * 2, "ff": [T + N // 2] * 2}  # the feed-forward finds the grid at its end

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _token_counts(model, kw),
                                         unmerged, ff_only, reapply=True)


def test_cogview3plus_feed_forward_merges_the_image_after_the_text() -> None:
    # merge_attn=False: the first block's feed-forward finds the grid at the end of [text, image] and merges it there;
    # its text rows, in and out, are the unmerged call's exactly
    model, kw = _transformer(), _inputs()
    ff = model.transformer_blocks[0].ff
    seen: list[tuple[Tensor, Tensor]] = []
    handle = ff.register_forward_hook(lambda m, a, out: seen.append((a[0], out)) and None)
    _run(model, kw)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5, merge_attn=False))
    _run(model, kw)
    handle.remove()
    (x_dense, y_dense), (x_merged, y_merged) = seen
    # (this hook runs before merging's, which unmerges the output: it sees the merged call's own tokens)
    assert x_merged.shape == y_merged.shape == (2, T + N // 2, 32) and y_dense.shape == (2, T + N, 32)
    assert torch.equal(x_merged[:, :T], x_dense[:, :T]) and torch.equal(y_merged[:, :T], y_dense[:, :T])
    remove_token_merging(model)


def test_cogview3plus_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_cogview3plus_batch_samples_merge_as_each_alone() -> None:
    # no positional table in the blocks: each sample gets its own matching
    model, kw = _transformer(), _inputs()
    contract.batch_matches_each_sample_alone(
        model, lambda: _run(model, kw),
        lambda i: _run(model, {k: v[i:i + 1] if isinstance(v, Tensor) else v for k, v in kw.items()}))


def test_cogview3plus_is_supported() -> None:
    assert merging_supports(_transformer()) is None


def _pipe_call() -> dict:
    return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 32, "width": 48, "num_inference_steps": 3,
            "max_sequence_length": 16, "output_type": "np", "generator": torch.Generator().manual_seed(0)}


def test_cogview3plus_pipeline_generations(caplog: pytest.LogCaptureFixture) -> None:
    contract.pipeline_generations(tiny_cogview3plus(seed=0), _pipe_call, (2, 32, 48, 3), caplog)


def test_cogview3plus_pipeline_reuses_matchings_between_recompute_steps(caplog: pytest.LogCaptureFixture) -> None:
    # hits: step 1 reuses step 0's matchings, in each of the 2 blocks; merged: 3 steps x 2 blocks x half of the 8x12
    # grid (CFG: one call)
    contract.pipeline_reuses_matchings(tiny_cogview3plus(seed=0), _pipe_call, 2, 3 * 2 * 48, caplog)


def test_cli_generate_merges_on_a_cogview3plus_pipeline(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    contract.cli_generate_merges(tmp_path, caplog, tiny_cogview3plus(seed=0), "cogview3plus", "CogView3PlusPipeline")
