"""Token merging on Krea 2 (``Krea2Transformer2DModel``, ``Krea2Pipeline``): the image grid, last in every block's
``[text, image]`` sequence and read from ``position_ids``, merges in the attention (its RoPE rows and key mask along)
and the feed-forward; the text never merges, and one matching serves a batch (its RoPE table has no batch axis)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_krea2")

from tokensparse.integrations.diffusers_tiny_krea2 import tiny_krea2  # noqa: E402
from tokensparse.integrations.merging_hooks import (  # noqa: E402
    apply_token_merging,
    merging_state,
    merging_supports,
)
from tokensparse.integrations.merging_krea2 import image_grid  # noqa: E402
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from . import merging_contract as contract  # noqa: E402

H, W, T = 6, 10, 12  # the image grid of _inputs (60 tokens) and caption tokens (the second sample's: 8, padded)
N = H * W


def _transformer() -> nn.Module:
    return tiny_krea2(seed=0).transformer  # 2 blocks; dim 32


def _ids(h: int = H, w: int = W) -> Tensor:
    return diffusers.Krea2Pipeline.prepare_position_ids(T, h, w, torch.device("cpu"))


def _inputs(batch: int = 2, smooth: bool = False, seed: int = 0) -> dict:
    """Packed latents ``(B, N, 16)`` (a 6x10 grid) and ``T`` caption tokens of two tapped layers, the last sample's 8
    visible."""
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 16, 3, 5, generator=g), size=(H, W), mode="bilinear")
    else:
        x = torch.randn(batch, 16, H, W, generator=g)
    mask = torch.ones(batch, T, dtype=torch.bool)
    mask[-1, 8:] = False
    return {"hidden_states": x.flatten(2).transpose(1, 2), "encoder_hidden_states": torch.randn(batch, T, 2, 16,
                                                                                                generator=g),
            "timestep": torch.full((batch,), 0.7), "position_ids": _ids(), "encoder_attention_mask": mask,
            "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _token_counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    subs = [(key, getattr(blk, key)) for blk in model.transformer_blocks for key in ("attn", "ff")]
    return contract.tokens_seen(subs, lambda: _run(model, kw))


def test_krea2_reads_the_grid_from_the_image_position_ids() -> None:
    assert image_grid(_ids(), N) == (H, W) and image_grid(_ids(1, 7), 7) == (1, 7)
    assert image_grid(_ids(), N - 1) is None  # a text row (0, 0, 0) among them: no grid from 0
    shuffled = _ids()
    shuffled[T:] = shuffled[T:].flip(0)
    assert image_grid(shuffled, N) is None and image_grid(None, N) is None


def test_krea2_merges_the_image_tokens_only_and_removes_exactly() -> None:
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    unmerged = _token_counts(model, kw)
    assert unmerged == {"attn": [T + N] * 2, "ff": [T + N] * 2}
    attn = model.transformer_blocks[0].attn
    dense_kw = contract.call_kwargs(attn, lambda: _run(model, kw))
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    assert _token_counts(model, kw) == {"attn": [T + N // 2] * 2, "ff": [T + N // 2] * 2}  # the text passes whole
    assert merging_state(model).merged_tokens == 2 * N // 2
    merged_kw = contract.call_kwargs(attn, lambda: _run(model, kw))
    for table, dense_table in zip(merged_kw["image_rotary_emb"], dense_kw["image_rotary_emb"]):
        assert table.shape[0] == T + N // 2 and torch.equal(table[:T], dense_table[:T])  # the text's rows all stay
        rows = [next(j for j in range(N) if torch.equal(dense_table[T + j], r)) for r in table[T:]]
        assert rows == sorted(set(rows)), rows  # the kept tokens' own rows, in order
    mask = merged_kw["attention_mask"]  # (B, 1, 1, T + N'): the text's entries (padding hidden), the kept tokens'
    assert mask.shape == (2, 1, 1, T + N // 2) and torch.equal(mask[..., :T], dense_kw["attention_mask"][..., :T])
    assert mask[..., T:].all() and not mask[1, ..., 8:T].any()

    def mlp_only(counts: dict[str, list[int]]) -> None:
        assert counts == {"attn": [T + N] * 2, "ff": [T + N // 2] * 2}

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _token_counts(model, kw),
                                         unmerged, mlp_only, reapply=True)


def test_krea2_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_krea2_batch_shares_one_matching() -> None:
    # the RoPE table has no batch axis: one matching (from the batch's mean tokens) serves every sample
    model, kw = _transformer(), _inputs()
    per_sample = {k: v for k, v in kw.items() if k != "position_ids"}  # the helper slices and repeats these
    contract.batch_shares_one_matching(model, model.transformer_blocks[0].attn,
                                       lambda k: _run(model, {**k, "position_ids": _ids()}), per_sample)


def test_krea2_is_supported() -> None:
    assert merging_supports(_transformer()) is None


def _pipe_call() -> dict:
    return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 32, "width": 48, "num_inference_steps": 3,
            "max_sequence_length": 192, "output_type": "np", "generator": torch.Generator().manual_seed(0)}


def test_krea2_pipeline_generations(caplog: pytest.LogCaptureFixture) -> None:
    contract.pipeline_generations(tiny_krea2(seed=0), _pipe_call, (2, 32, 48, 3), caplog)


def test_krea2_pipeline_reuses_matchings_between_recompute_steps(caplog: pytest.LogCaptureFixture) -> None:
    # hits: step 1 reuses step 0's matchings, in each of the 2 blocks, for the conditional and the unconditional
    # call; merged: 3 steps x 2 calls x 2 blocks x half of the 8x12 grid
    contract.pipeline_reuses_matchings(tiny_krea2(seed=0), _pipe_call, 4, 3 * 2 * 2 * 48, caplog)


def test_cli_generate_merges_on_a_krea2_pipeline(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    contract.cli_generate_merges(tmp_path, caplog, tiny_krea2(seed=0), "krea2", "Krea2Pipeline")
