"""Token merging on HunyuanDiT (``HunyuanDiT2DModel``, ``HunyuanDiTPipeline``): the image tokens merge in every block's
self-attention and feed-forward (and, with ``merge_cross``, its cross-attention's queries), the RoPE rows of the kept
tokens along; the captions never."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.hunyuan_transformer_2d")

from diffusers.models.embeddings import get_2d_rotary_pos_embed  # noqa: E402

from tokensparse.integrations.diffusers_tiny_hunyuan_dit import tiny_hunyuan_dit  # noqa: E402
from tokensparse.integrations.merging_hooks import (  # noqa: E402
    apply_token_merging,
    merging_state,
    merging_supports,
    remove_token_merging,
)
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from . import merging_contract as contract  # noqa: E402

N = 60  # image tokens of _inputs: a 6x10 grid (patch 2)


def _transformer() -> nn.Module:
    return tiny_hunyuan_dit(seed=0).transformer  # 4 blocks (the last one fed a long skip); dim 32, patch 2


def _inputs(batch: int = 2, h: int = 12, w: int = 20, smooth: bool = False, seed: int = 0) -> dict:
    """Latents ``(B, 4, h, w)`` (``h/2 x w/2`` tokens: 6x10 = 60), BERT (77) and T5 (256) captions, their masks, and
    the grid's RoPE table ``(cos, sin)``, each ``(60, 16)``."""
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 4, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    else:
        x = torch.randn(batch, 4, h, w, generator=g)
    mask, mask_t5 = torch.ones(batch, 77, dtype=torch.long), torch.ones(batch, 256, dtype=torch.long)
    mask[-1, 20:], mask_t5[-1, 30:] = 0, 0
    rope = get_2d_rotary_pos_embed(16, ((0, 0), (h // 2, w // 2)), (h // 2, w // 2), output_type="pt")
    return {"hidden_states": x, "timestep": torch.full((batch,), 700.0),
            "encoder_hidden_states": torch.randn(batch, 77, 16, generator=g), "text_embedding_mask": mask,
            "encoder_hidden_states_t5": torch.randn(batch, 256, 16, generator=g), "text_embedding_mask_t5": mask_t5,
            "image_meta_size": torch.tensor([[8.0 * h, 8.0 * w] * 2 + [0.0, 0.0]]).repeat(batch, 1),
            "style": torch.zeros(batch, dtype=torch.long), "image_rotary_emb": rope, "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _token_counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    """Tokens each sublayer of each block saw in one call."""
    return contract.tokens_seen([(key, getattr(blk, key)) for blk in model.blocks for key in ("attn1", "attn2", "ff")],
                                lambda: _run(model, kw))


def _counts(attn1: int, attn2: int, ff: int) -> dict[str, list[int]]:
    return {"attn1": [attn1] * 4, "attn2": [attn2] * 4, "ff": [ff] * 4}


def _kept_rows(dense: tuple[Tensor, Tensor], merged: tuple[Tensor, Tensor]) -> list[int]:
    return [next(j for j in range(N) if torch.equal(dense[0][j], c) and torch.equal(dense[1][j], s))
            for c, s in zip(*merged)]


def test_hunyuan_dit_merges_the_image_tokens_and_removes_exactly() -> None:
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    unmerged = _token_counts(model, kw)
    assert unmerged == _counts(N, N, N)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    assert _token_counts(model, kw) == _counts(30, N, 30)
    assert merging_state(model).merged_tokens == 4 * 30
    attn = contract.call_kwargs(model.blocks[0].attn1, lambda: _run(model, kw))
    cos, sin = attn["image_rotary_emb"]
    assert cos.shape == sin.shape == (30, 16)  # one table for the batch
    rows = _kept_rows(kw["image_rotary_emb"], (cos, sin))
    assert rows == sorted(set(rows)), rows  # each kept token keeps its own RoPE row, in order
    cross = contract.call_kwargs(model.blocks[0].attn2, lambda: _run(model, kw))
    assert cross["encoder_hidden_states"].shape == (2, 77 + 256, 16)  # the captions are never merged
    assert cross["image_rotary_emb"][0].shape == (N, 16)

    def ff_only(counts: dict[str, list[int]]) -> None:
        assert counts == _counts(N, N, 30)

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _token_counts(model, kw),
                                         unmerged, ff_only, reapply=True)


def test_hunyuan_dit_cross_attention_merges_its_queries_and_their_rope_rows() -> None:
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5, merge_cross=True))
    assert _token_counts(model, kw) == _counts(30, 30, 30)
    cross = contract.call_kwargs(model.blocks[0].attn2, lambda: _run(model, kw))
    assert cross["encoder_hidden_states"].shape == (2, 77 + 256, 16)
    rows = _kept_rows(kw["image_rotary_emb"], cross["image_rotary_emb"])
    assert len(rows) == 30 and rows == sorted(set(rows))
    apply_token_merging(model, TokenMergingConfig(ratio=0.5, merge_attn=False, merge_mlp=False, merge_cross=True))
    assert _token_counts(model, kw) == _counts(N, 30, N)
    merged = _run(model, kw)
    assert torch.isfinite(merged).all() and not torch.equal(merged, dense)
    remove_token_merging(model)
    assert torch.equal(_run(model, kw), dense)


def test_hunyuan_dit_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(h=16, w=24, smooth=True)  # 8x12 tokens (4 blocks: 6x10 drifts a little more)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_hunyuan_dit_batch_of_two_shares_one_matching() -> None:
    # the RoPE table has no batch axis: one matching, from the batch's mean tokens, for two different samples;
    # two copies of one sample merge as it alone would
    model = _transformer()
    contract.batch_shares_one_matching(model, model.blocks[0].attn1, lambda kw: _run(model, kw), _inputs())


def test_hunyuan_dit_a_rope_table_of_another_grid_runs_unmerged(caplog: pytest.LogCaptureFixture) -> None:
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    kw["image_rotary_emb"] = tuple(t[:40] for t in kw["image_rotary_emb"])  # not one row per token: not its grid
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    with caplog.at_level(logging.WARNING, logger="tokensparse"), pytest.raises(RuntimeError):
        _run(model, kw)  # diffusers itself cannot rotate 60 tokens by 40 rows: merging stays out of the way
    assert merging_state(model).grids_found == 0
    remove_token_merging(model)
    assert torch.equal(_run(model, _inputs()), dense)
    assert merging_supports(model) is None


def _pipe_call() -> dict:
    return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 64, "width": 128, "num_inference_steps": 3,
            "output_type": "np", "use_resolution_binning": False, "generator": torch.Generator().manual_seed(0)}


def test_hunyuan_dit_pipeline_generations(caplog: pytest.LogCaptureFixture) -> None:
    contract.pipeline_generations(tiny_hunyuan_dit(seed=0), _pipe_call, (2, 64, 128, 3), caplog)


def test_hunyuan_dit_pipeline_reuses_matchings_between_recompute_steps() -> None:
    # hits: step 1 reuses step 0's matchings, in each of the 4 blocks; merged: 3 steps x 4 blocks x half of the 4x8
    # grid (CFG: one call)
    contract.pipeline_reuses_matchings(tiny_hunyuan_dit(seed=0), _pipe_call, 4, 3 * 4 * 16)