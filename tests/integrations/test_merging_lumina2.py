"""Token merging on Lumina 2 (``Lumina2Transformer2DModel``, ``Lumina2Pipeline``): the image grid merges in the noise
refiner and the joint layers (reordered image-first where the batch's captions differ in length), the caption and
the context refiner never."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_lumina2")

from tokensparse.integrations.diffusers_tiny_lumina2 import tiny_lumina2  # noqa: E402
from tokensparse.integrations.merging_hooks import apply_token_merging, merging_state, remove_token_merging  # noqa: E402
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from . import merging_contract as contract  # noqa: E402

CAPS = (5, 40)  # unpadded caption lengths of the two samples (padded to 40)


def _transformer() -> nn.Module:
    return tiny_lumina2(seed=0).transformer  # 1 noise refiner, 1 context refiner, 2 joint layers; dim 32


def _inputs(caps: tuple[int, ...] = CAPS, h: int = 12, w: int = 20, smooth: bool = False, seed: int = 0) -> dict:
    """Latents ``(B, 4, h, w)`` (``h/2 x w/2`` tokens: 6x10 = 60) and captions padded to 40 tokens, ``caps`` of them
    real (the joint layers see ``max(caps) + 60`` tokens: 100)."""
    g = torch.Generator().manual_seed(seed)
    b = len(caps)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(b, 4, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    else:
        x = torch.randn(b, 4, h, w, generator=g)
    mask = torch.zeros(b, 40, dtype=torch.long)
    for i, c in enumerate(caps):
        mask[i, :c] = 1
    return {"hidden_states": x, "timestep": torch.full((b,), 0.3), "encoder_attention_mask": mask,
            "encoder_hidden_states": torch.randn(b, 40, 16, generator=g), "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _token_counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    """Tokens each sublayer of each block saw in one call, by block group."""
    return contract.tokens_seen([(group, sub) for group in ("noise_refiner", "context_refiner", "layers")
                        for blk in getattr(model, group) for sub in (blk.attn, blk.feed_forward)],
                       lambda: _run(model, kw))


def _attention_kwargs(model: nn.Module, kw: dict) -> dict:
    return contract.call_kwargs(model.layers[0].attn, lambda: _run(model, kw))


def test_lumina2_merges_the_image_grid_only_and_removes_exactly() -> None:
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    unmerged, dense_attn = _token_counts(model, kw), _attention_kwargs(model, kw)
    assert unmerged == {"noise_refiner": [60, 60], "context_refiner": [40, 40], "layers": [100] * 4}
    assert dense_attn["attention_mask"].shape == (2, 100)  # the first sample's sequence is 35 tokens shorter
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    seen = _token_counts(model, kw)
    assert seen == {"noise_refiner": [30, 30], "context_refiner": [40, 40], "layers": [70] * 4}
    assert merging_state(model).merged_tokens == 3 * 30  # per sample: 3 blocks, 30 tokens each
    attn = _attention_kwargs(model, kw)
    mask, freqs, dense_freqs = attn["attention_mask"], attn["image_rotary_emb"], dense_attn["image_rotary_emb"]
    assert attn["encoder_hidden_states"] is attn["hidden_states"]  # the keys merge with the queries
    assert mask.shape == (2, 70) and freqs.shape == (2, 70, 8)
    for b, c in enumerate(CAPS):  # reordered: [image (kept tokens), caption, padding]
        rest = torch.cat([dense_freqs[b, :c], dense_freqs[b, c + 60:]])
        assert torch.equal(freqs[b, 30:], rest)
        assert torch.equal(mask[b, 30:], torch.cat([dense_attn["attention_mask"][b, :c],
                                                    dense_attn["attention_mask"][b, c + 60:]]))
        assert bool(mask[b, :30].all())
        rows = [next(j for j in range(60) if torch.equal(dense_freqs[b, c + j], r)) for r in freqs[b, :30]]
        assert rows == sorted(set(rows)), rows  # each kept image token keeps its own RoPE row, in order

    def ff_only(only_ff: dict[str, list[int]]) -> None:
        assert only_ff["layers"] == [100, 70, 100, 70] and only_ff["noise_refiner"] == [60, 30]

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _token_counts(model, kw),
                                         unmerged, ff_only, reapply=True)


def test_lumina2_captions_of_one_length_merge_in_place() -> None:
    # samples with captions of one length: the image follows the caption in every sample, no reordering needed
    model, kw = _transformer(), _inputs(caps=(17, 17))
    dense_freqs = _attention_kwargs(model, kw)["image_rotary_emb"]
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    assert _token_counts(model, kw)["layers"] == [47] * 4  # 17 caption + 30 kept image tokens
    freqs = _attention_kwargs(model, kw)["image_rotary_emb"]
    assert torch.equal(freqs[:, :17], dense_freqs[:, :17])
    remove_token_merging(model)


def test_lumina2_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_lumina2_batch_of_two_matches_each_sample_alone() -> None:
    # per-sample RoPE rows: each sample its own matching (from the same destination draw), so a sample merges as it
    # would alone, whatever the other's caption length (in the batch its joint blocks run reordered)
    model, kw = _transformer(), _inputs()
    contract.batch_matches_each_sample_alone(model, lambda: _run(model, kw), lambda i: _run(model, {
        **kw, **{k: kw[k][i:i + 1] for k in ("hidden_states", "timestep", "encoder_attention_mask",
                                             "encoder_hidden_states")}}))


def _pipe_call() -> dict:
    return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 64, "width": 128, "num_inference_steps": 3,
            "guidance_scale": 4.0, "output_type": "np", "generator": torch.Generator().manual_seed(0)}


def test_lumina2_pipeline_generations() -> None:
    # the timestep rises over a Lumina generation (1 - t/1000): still one generation of 3 steps
    contract.pipeline_generations(tiny_lumina2(seed=0), _pipe_call, (2, 64, 128, 3))


def test_cli_generate_merges_on_a_lumina2_pipeline(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    contract.cli_generate_merges(tmp_path, caplog, tiny_lumina2(seed=0), "lumina2", "Lumina2Pipeline", height=64,
                                 width=96)
