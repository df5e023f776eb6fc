"""Token merging on HiDream-I1 (``HiDreamImageTransformer2DModel``, ``HiDreamImagePipeline``): the image grid at the
start of every double- and single-stream block's sequence merges in the attention (its RoPE rows and key mask along)
and the image's mixture-of-experts feed-forward; the text, and a non-square latent's padding, never."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_hidream_image")

from tokensparse.integrations.diffusers_tiny_hidream import tiny_hidream  # noqa: E402
from tokensparse.integrations.merging_hooks import (  # noqa: E402
    apply_token_merging,
    merging_state,
    remove_token_merging,
)
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from . import merging_contract as contract  # noqa: E402

T5, LLAMA = 12, 10  # caption tokens: the single blocks see [image, padding, T5, Llama, Llama]
MAX_SEQ = 256  # the tiny transformer's max_seq: a non-square latent's grid is padded to it


def _transformer() -> nn.Module:
    return tiny_hidream(seed=0).transformer  # 2 double-, 2 single-stream blocks; dim 32, patch 2


def _inputs(batch: int = 2, h: int = 16, w: int = 16, smooth: bool = False, seed: int = 0) -> dict:
    """Latents ``(B, 4, h, w)`` (``h/2 x w/2`` tokens: 8x8 = 64 when square), T5 and Llama captions (2 layers), pooled
    CLIP embeddings."""
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 4, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    else:
        x = torch.randn(batch, 4, h, w, generator=g)
    return {"hidden_states": x, "timesteps": torch.full((batch,), 700.0),
            "encoder_hidden_states_t5": torch.randn(batch, T5, 16, generator=g),
            "encoder_hidden_states_llama3": torch.randn(2, batch, LLAMA, 16, generator=g),
            "pooled_embeds": torch.randn(batch, 32, generator=g), "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        out = model(**kw)[0]
    return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [("double", b.block) for b in model.double_stream_blocks] + [("single", b.block)
                                                                       for b in model.single_stream_blocks]


def _token_counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    """Tokens each sublayer saw in one call: ``attn1`` and ``ff_i`` of the double and the single blocks, ``ff_t`` of
    the double blocks."""
    subs = [(f"{kind}_{key}", getattr(blk, key)) for kind, blk in _blocks(model) for key in ("attn1", "ff_i", "ff_t")
            if hasattr(blk, key)]
    seen: dict[str, list[int]] = {}
    handles = [sub.register_forward_pre_hook(lambda m, a, k, key=key: seen.setdefault(key, []).append(
        (a[0] if a else next(iter(k.values()))).shape[1]), with_kwargs=True) for key, sub in subs]
    _run(model, kw)
    for h in handles:
        h.remove()
    return seen


def _counts(gone_attn: int, gone_mlp: int, seq: int = 64) -> dict[str, list[int]]:
    """What each sublayer sees where ``gone_*`` grid tokens are merged away from the image part of the sequence (the
    grid and any padding: ``seq`` tokens); the double blocks' text is ``[T5, Llama, this block's Llama]``."""
    text = T5 + 2 * LLAMA
    image, mlp = seq - gone_attn, seq - gone_mlp
    return {"double_attn1": [image] * 2, "double_ff_i": [mlp] * 2, "double_ff_t": [text] * 2,
            "single_attn1": [image + text] * 2, "single_ff_i": [mlp + text] * 2}


def test_hidream_merges_the_image_grid_only_and_removes_exactly() -> None:
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    unmerged = _token_counts(model, kw)
    assert unmerged == _counts(0, 0)
    box: dict[str, dict] = {}
    handle = model.double_stream_blocks[0].block.attn1.register_forward_pre_hook(
        lambda m, a, k: box.setdefault("dense", k) and None, with_kwargs=True)
    _run(model, kw)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    assert _token_counts(model, kw) == _counts(32, 32)  # the text passes whole
    assert merging_state(model).merged_tokens == 4 * 32
    handle.remove()
    merged_kw = contract.call_kwargs(model.double_stream_blocks[0].block.attn1, lambda: _run(model, kw))
    rope, dense_rope = merged_kw["image_rotary_emb"], box["dense"]["image_rotary_emb"]
    assert rope.shape[:2] == (2, 32 + T5 + 2 * LLAMA) and dense_rope.shape[1] == 64 + T5 + 2 * LLAMA
    for b in range(2):  # each sample's kept tokens keep their own rows, in order; the text's all stay
        rows = [next(j for j in range(64) if torch.equal(dense_rope[b, j], r)) for r in rope[b, :32]]
        assert rows == sorted(set(rows)), rows
        assert torch.equal(rope[b, 32:], dense_rope[b, 64:])

    def ff_only(counts: dict[str, list[int]]) -> None:
        assert counts == _counts(0, 32)

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _token_counts(model, kw),
                                         unmerged, ff_only, reapply=True)


def test_hidream_non_square_latent_merges_its_grid_not_its_padding() -> None:
    # a 16x24 latent: an 8x12 grid (96 tokens) padded to max_seq (256) with masked tokens; the mask thins with the grid
    model, kw = _transformer(), _inputs(w=24)
    dense = _run(model, kw)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    assert _token_counts(model, kw) == _counts(48, 48, seq=MAX_SEQ)
    masks: list[Tensor] = []
    handle = model.single_stream_blocks[0].block.attn1.register_forward_pre_hook(lambda m, a: masks.append(a[1]))
    merged = _run(model, kw)
    handle.remove()
    text = T5 + 2 * LLAMA
    assert masks[0].shape == (2, MAX_SEQ - 48 + text)
    assert masks[0][:, :48].eq(1).all() and masks[0][:, 48:MAX_SEQ - 48].eq(0).all() and masks[0][:, -text:].eq(1).all()
    assert torch.isfinite(merged).all() and not torch.equal(merged, dense)
    remove_token_merging(model)
    assert torch.equal(_run(model, kw), dense)


def test_hidream_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_hidream_batch_samples_merge_as_each_alone() -> None:
    # the RoPE table has a batch axis: each sample gets its own matching
    model, kw = _transformer(), _inputs()

    def alone(i: int) -> Tensor:
        one = {k: v[i:i + 1] if isinstance(v, Tensor) else v for k, v in kw.items()}
        one["encoder_hidden_states_llama3"] = kw["encoder_hidden_states_llama3"][:, i:i + 1]
        return _run(model, one)

    contract.batch_matches_each_sample_alone(model, lambda: _run(model, kw), alone)


def _pipe_call() -> dict:
    return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 32, "width": 32, "num_inference_steps": 3,
            "max_sequence_length": 16, "output_type": "np", "generator": torch.Generator().manual_seed(0)}


def test_hidream_pipeline_generations(caplog: pytest.LogCaptureFixture) -> None:
    contract.pipeline_generations(tiny_hidream(seed=0), _pipe_call, (2, 32, 32, 3), caplog)


def test_hidream_pipeline_reuses_matchings_between_recompute_steps(caplog: pytest.LogCaptureFixture) -> None:
    # hits: step 1 reuses step 0's matchings, in each of the 4 blocks; merged: 3 steps x 4 blocks x half of the 8x8
    # grid (CFG: one call)
    contract.pipeline_reuses_matchings(tiny_hidream(seed=0), _pipe_call, 4, 3 * 4 * 32, caplog)