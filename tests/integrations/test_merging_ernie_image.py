"""Token merging on ERNIE-Image (``ErnieImageTransformer2DModel``, ``ErnieImagePipeline``): the image grid, first in
every block's ``[image, text]`` sequence, merges in the attention (its RoPE rows and key mask along) and in the MLP,
which takes the sequence first; the text never merges, and each sample of a batch gets its own matching."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_ernie_image")

from tokensparse.integrations.diffusers_tiny_ernie_image import tiny_ernie_image  # noqa: E402
from tokensparse.integrations.merging_hooks import (  # noqa: E402
    apply_token_merging,
    merging_state,
    merging_supports,
)
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from . import merging_contract as contract  # noqa: E402

N, T = 60, 12  # image tokens of _inputs (a 6x10 grid, patch 1) and caption tokens (the second sample's: 8, padded)


def _transformer() -> nn.Module:
    return tiny_ernie_image(seed=0).transformer  # 2 blocks; dim 32, patch 1


def _inputs(batch: int = 2, h: int = 6, w: int = 10, smooth: bool = False, seed: int = 0) -> dict:
    """Latents ``(B, 16, h, w)`` (``h x w`` tokens: 6x10 = 60) and ``T`` caption tokens, the last sample's 8 long."""
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 16, 3, 5, generator=g), size=(h, w), mode="bilinear")
    else:
        x = torch.randn(batch, 16, h, w, generator=g)
    lens = torch.full((batch,), T, dtype=torch.long)
    lens[-1] = 8
    text = torch.randn(batch, T, 16, generator=g)
    text[-1, 8:] = 0  # the pipeline pads with zeros
    return {"hidden_states": x, "timestep": torch.full((batch,), 700.0), "text_bth": text, "text_lens": lens,
            "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _token_counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    """Tokens each block's ``self_attention`` (batch first) and ``mlp`` (sequence first) saw in one call."""
    seen: dict[str, list[int]] = {}
    handles = [sub.register_forward_pre_hook(lambda m, a, k, key=key, dim=dim: seen.setdefault(key, []).append(
        (a[0] if a else next(iter(k.values()))).shape[dim]), with_kwargs=True)
        for blk in model.layers for key, sub, dim in (("attn", blk.self_attention, 1), ("mlp", blk.mlp, 0))]
    _run(model, kw)
    for h in handles:
        h.remove()
    return seen


def test_ernie_image_merges_the_image_grid_only_and_removes_exactly() -> None:
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    unmerged = _token_counts(model, kw)
    assert unmerged == {"attn": [N + T] * 2, "mlp": [N + T] * 2}
    attn = model.layers[0].self_attention
    dense_kw = contract.call_kwargs(attn, lambda: _run(model, kw))
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    assert _token_counts(model, kw) == {"attn": [N // 2 + T] * 2, "mlp": [N // 2 + T] * 2}  # the text passes whole
    assert merging_state(model).merged_tokens == 2 * N // 2
    merged_kw = contract.call_kwargs(attn, lambda: _run(model, kw))
    rope, dense_rope = merged_kw["image_rotary_emb"], dense_kw["image_rotary_emb"]
    assert rope.shape[:2] == (2, N // 2 + T) and dense_rope.shape[:2] == (2, N + T)
    for b in range(2):  # each sample's kept tokens keep their own rows, in order; the text's all stay
        rows = [next(j for j in range(N) if torch.equal(dense_rope[b, j], r)) for r in rope[b, :N // 2]]
        assert rows == sorted(set(rows)), rows
        assert torch.equal(rope[b, N // 2:], dense_rope[b, N:])
    mask = merged_kw["attention_mask"]  # (B, 1, 1, S): the kept image tokens' entries (all visible), the text's
    assert mask.shape == (2, 1, 1, N // 2 + T) and torch.equal(mask[..., N // 2:], dense_kw["attention_mask"][..., N:])
    assert mask[..., :N // 2].all() and not mask[1, ..., -4:].any()

    def mlp_only(counts: dict[str, list[int]]) -> None:
        assert counts == {"attn": [N + T] * 2, "mlp": [N // 2 + T] * 2}  # the MLP finds the grid in (S, B, C)

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _token_counts(model, kw),
                                         unmerged, mlp_only, reapply=True)


def test_ernie_image_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_ernie_image_batch_samples_merge_as_each_alone() -> None:
    # the RoPE table has a batch axis: each sample gets its own matching (the padded sample alone: its own length)
    model, kw = _transformer(), _inputs()

    def alone(i: int) -> Tensor:
        one = {k: v[i:i + 1] if isinstance(v, Tensor) else v for k, v in kw.items()}
        n = int(one["text_lens"][0])
        return _run(model, {**one, "text_bth": one["text_bth"][:, :n]})

    contract.batch_matches_each_sample_alone(model, lambda: _run(model, kw), alone)


def test_ernie_image_is_supported() -> None:
    assert merging_supports(_transformer()) is None


def _pipe_call() -> dict:
    return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 32, "width": 48, "num_inference_steps": 3,
            "output_type": "np", "generator": torch.Generator().manual_seed(0)}


def test_ernie_image_pipeline_generations(caplog: pytest.LogCaptureFixture) -> None:
    contract.pipeline_generations(tiny_ernie_image(seed=0), _pipe_call, (2, 32, 48, 3), caplog)


def test_ernie_image_pipeline_reuses_matchings_between_recompute_steps(caplog: pytest.LogCaptureFixture) -> None:
    # hits: step 1 reuses step 0's matchings, in each of the 2 blocks; merged: 3 steps x 2 blocks x half of the 8x12
    # grid (CFG: one call)
    contract.pipeline_reuses_matchings(tiny_ernie_image(seed=0), _pipe_call, 2, 3 * 2 * 48, caplog)


def test_cli_generate_merges_on_an_ernie_image_pipeline(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    contract.cli_generate_merges(tmp_path, caplog, tiny_ernie_image(seed=0), "ernie", "ErnieImagePipeline")
