"""Token merging on Lumina-Next (``LuminaNextDiT2DModel``, ``LuminaPipeline``): every block's image tokens merge in
its self-attention (keys, RoPE rows and key mask along; the proportional softmax scale kept), its cross-attention
(the caption's keys pass), the projection of their summed per-head outputs and the feed-forward; the caption never
merges, and each sample of a batch gets its own matching."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.lumina_nextdit2d")

from tokensparse.integrations.diffusers_tiny_lumina_next import tiny_lumina_next  # noqa: E402
from tokensparse.integrations.merging_hooks import (  # noqa: E402
    apply_token_merging,
    merging_state,
    merging_supports,
)
from tokensparse.integrations.merging_lumina_next import proportional_base  # noqa: E402
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from . import merging_contract as contract  # noqa: E402

N, T, BASE = 60, 8, 16  # image tokens of _inputs (a 6x10 grid, patch 2), caption tokens, base_sequence_length


def _transformer() -> nn.Module:
    return tiny_lumina_next(seed=0).transformer  # 2 blocks; dim 32, 2 heads, patch 2


def _inputs(batch: int = 2, h: int = 12, w: int = 20, smooth: bool = False, seed: int = 0) -> dict:
    """Latents ``(B, 4, h, w)`` (``h/2 x w/2`` tokens: 6x10 = 60), ``T`` caption tokens (the last sample's 5 visible),
    the pipeline's RoPE table and proportional attention."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 4, h // 6, w // 6, generator=g), size=(h, w),
                                      mode="bilinear")
    else:
        x = torch.randn(batch, 4, h, w, generator=g)
    mask = torch.ones(batch, T, dtype=torch.long)
    mask[-1, 5:] = 0
    return {"hidden_states": x, "timestep": torch.full((batch,), 0.3), "encoder_mask": mask,
            "encoder_hidden_states": torch.randn(batch, T, 16, generator=g),
            "image_rotary_emb": get_2d_rotary_pos_embed_lumina(16, 384, 384),
            "cross_attention_kwargs": {"base_sequence_length": BASE}, "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _token_counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    subs = [(key, getattr(blk, key)) for blk in model.layers for key in ("attn1", "attn2", "feed_forward")]
    subs += [("to_out", blk.attn2.to_out[0]) for blk in model.layers]
    seen: dict[str, list[int]] = {}
    handles = [m.register_forward_pre_hook(lambda m, a, k, key=key: seen.setdefault(key, []).append(
        (a[0] if a else next(iter(k.values()))).shape[1]), with_kwargs=True) for key, m in subs]
    _run(model, kw)
    for h in handles:
        h.remove()
    return seen


def test_lumina_next_merges_the_image_tokens_and_removes_exactly() -> None:
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    unmerged = _token_counts(model, kw)
    assert unmerged == {k: [N] * 2 for k in ("attn1", "attn2", "feed_forward", "to_out")}
    blk = model.layers[0]
    dense_self = contract.call_kwargs(blk.attn1, lambda: _run(model, kw))
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    assert _token_counts(model, kw) == {k: [N // 2] * 2 for k in ("attn1", "attn2", "feed_forward", "to_out")}
    assert merging_state(model).merged_tokens == 2 * N // 2
    merged_self = contract.call_kwargs(blk.attn1, lambda: _run(model, kw))
    merged_cross = contract.call_kwargs(blk.attn2, lambda: _run(model, kw))
    # self-attention: its keys are its merged tokens; each sample's kept tokens keep their own RoPE rows, in order
    assert merged_self["encoder_hidden_states"] is merged_self["hidden_states"]
    rope, dense_rope = merged_self["query_rotary_emb"], dense_self["query_rotary_emb"]
    assert merged_self["key_rotary_emb"] is rope and rope.shape[:2] == (2, N // 2) and dense_rope.shape[:2] == (1, N)
    for b in range(2):
        rows = [next(j for j in range(N) if torch.equal(dense_rope[0, j], r)) for r in rope[b]]
        assert rows == sorted(set(rows)), rows
    assert merged_self["attention_mask"].shape == (2, N // 2) and merged_self["attention_mask"].all()
    # the proportional scale sqrt(log_base(queries)) is the unmerged grid's
    base = merged_self["base_sequence_length"]
    assert math.isclose(math.log(N // 2, base), math.log(N, BASE), rel_tol=1e-12)
    # cross-attention: the caption's keys, key mask and base pass as they are (no key RoPE: no proportional scale)
    assert merged_cross["encoder_hidden_states"].shape == (2, T, 16) and merged_cross["key_rotary_emb"] is None
    assert torch.equal(merged_cross["attention_mask"], kw["encoder_mask"].bool())
    assert torch.equal(merged_cross["query_rotary_emb"], rope) and merged_cross["base_sequence_length"] == BASE

    def mlp_only(counts: dict[str, list[int]]) -> None:
        assert counts == {"attn1": [N] * 2, "attn2": [N] * 2, "to_out": [N] * 2, "feed_forward": [N // 2] * 2}

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _token_counts(model, kw),
                                         unmerged, mlp_only, reapply=True)


def test_lumina_next_proportional_base_keeps_the_scale() -> None:
    for n, kept, base in ((60, 30, 16), (4096, 1024, 4096), (24, 7, 16.0)):
        assert math.isclose(math.log(kept, proportional_base(base, n, kept)), math.log(n, base), rel_tol=1e-12)
    assert proportional_base(16, 4, 1) == 16  # one query: its softmax is 1 whatever the scale
    assert proportional_base(16, 60, 60) == 16


def test_lumina_next_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_lumina_next_batch_samples_merge_as_each_alone() -> None:
    # the RoPE table, expanded to the batch, gets a row per sample: each sample gets its own matching
    model, kw = _transformer(), _inputs()

    def alone(i: int) -> Tensor:
        return _run(model, {k: v[i:i + 1] if isinstance(v, Tensor) and k != "image_rotary_emb" else v
                            for k, v in kw.items()})

    contract.batch_matches_each_sample_alone(model, lambda: _run(model, kw), alone)


def test_lumina_next_is_supported() -> None:
    assert merging_supports(_transformer()) is None


def _pipe_call() -> dict:
    return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 64, "width": 96, "num_inference_steps": 3,
            "output_type": "np", "clean_caption": False, "generator": torch.Generator().manual_seed(0)}


def test_lumina_next_pipeline_generations(caplog: pytest.LogCaptureFixture) -> None:
    contract.pipeline_generations(tiny_lumina_next(seed=0), _pipe_call, (2, 64, 96, 3), caplog)


def test_lumina_next_pipeline_reuses_matchings_between_recompute_steps(caplog: pytest.LogCaptureFixture) -> None:
    # hits: step 1 reuses step 0's matchings, in each of the 2 blocks; merged: 3 steps x 2 blocks x half of the 4x6
    # grid (CFG: one call)
    contract.pipeline_reuses_matchings(tiny_lumina_next(seed=0), _pipe_call, 2, 3 * 2 * 12, caplog)


def test_cli_generate_merges_on_a_lumina_next_pipeline(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    contract.cli_generate_merges(tmp_path, caplog, tiny_lumina_next(seed=0), "lumina", "LuminaPipeline",
                                 height=64, width=96)
