"""Token merging on HunyuanImage 2.1 (``HunyuanImageTransformer2DModel``, ``HunyuanImagePipeline``): the image tokens
merge in every double-stream block's attention (RoPE rows and the key mask over ``[image, text]`` along) and
feed-forward, and in every single-stream block's ``proj_mlp`` and attention; the text never."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_hunyuanimage")

from tokensparse.integrations.diffusers_tiny_hunyuan_image import tiny_hunyuan_image  # noqa: E402
from tokensparse.integrations.merging_hooks import (  # noqa: E402
    apply_token_merging,
    merging_state,
    merging_supports,
    remove_token_merging,
)
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from . import merging_contract as contract  # noqa: E402

N, TXT, TXT2 = 60, 20, 8  # image tokens (a 6x10 grid, patch 1); Qwen and ByT5 caption tokens


def _transformer() -> nn.Module:
    return tiny_hunyuan_image(seed=0).transformer  # 2 double-, 2 single-stream blocks; dim 32, patch 1


def _inputs(batch: int = 2, h: int = 6, w: int = 10, smooth: bool = False, seed: int = 0) -> dict:
    """Latents ``(B, 4, h, w)`` (6x10 = 60 tokens) and both captions, the second sample's padded (masked)."""
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 4, 3, 5, generator=g), size=(h, w), mode="bilinear")
    else:
        x = torch.randn(batch, 4, h, w, generator=g)
    mask, mask_2 = torch.ones(batch, TXT, dtype=torch.long), torch.ones(batch, TXT2, dtype=torch.long)
    mask[-1, 12:], mask_2[-1, 3:] = 0, 0
    return {"hidden_states": x, "timestep": torch.full((batch,), 700.0),
            "encoder_hidden_states": torch.randn(batch, TXT, 16, generator=g), "encoder_attention_mask": mask,
            "encoder_hidden_states_2": torch.randn(batch, TXT2, 16, generator=g), "encoder_attention_mask_2": mask_2,
            "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _token_counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    """Tokens each sublayer saw in one call (a single-stream block's ``proj_mlp``: ``[image, text]``)."""
    subs = [(key, getattr(blk, key)) for blk in model.transformer_blocks for key in ("attn", "ff", "ff_context")]
    subs += [(f"single_{key}", getattr(blk, key)) for blk in model.single_transformer_blocks
             for key in ("attn", "proj_mlp")]
    seen: dict[str, list[int]] = {}
    handles = [sub.register_forward_pre_hook(lambda m, a, k, key=key: seen.setdefault(key, []).append(
        (k.get("hidden_states") if k else a[0]).shape[1]), with_kwargs=True) for key, sub in subs]
    _run(model, kw)
    for h in handles:
        h.remove()
    return seen


def _counts(image: int, mlp: int) -> dict[str, list[int]]:
    text = TXT + TXT2
    return {"attn": [image] * 2, "ff": [mlp] * 2, "ff_context": [text] * 2, "single_attn": [image] * 2,
            "single_proj_mlp": [mlp + text] * 2}


def test_hunyuan_image_merges_the_image_tokens_only_and_removes_exactly(caplog: pytest.LogCaptureFixture) -> None:
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    unmerged = _token_counts(model, kw)
    assert unmerged == _counts(N, N)
    dense_attn = contract.call_kwargs(model.transformer_blocks[0].attn, lambda: _run(model, kw))
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        assert _token_counts(model, kw) == _counts(30, 30)  # the text passes whole
    assert not contract.ours(caplog)  # the key mask thinned, not refused
    assert merging_state(model).merged_tokens == 4 * 30
    attn = contract.call_kwargs(model.transformer_blocks[0].attn, lambda: _run(model, kw))
    assert attn["encoder_hidden_states"].shape == (2, TXT + TXT2, 32)
    cos, sin = attn["image_rotary_emb"]
    assert cos.shape == sin.shape == (30, 16)  # one table for the batch
    dense_cos, dense_sin = dense_attn["image_rotary_emb"]
    rows = [next(j for j in range(N) if torch.equal(dense_cos[j], c) and torch.equal(dense_sin[j], s))
            for c, s in zip(cos, sin)]
    assert rows == sorted(set(rows)), rows  # each kept token keeps its own RoPE row, in order
    mask, dense_mask = attn["attention_mask"], dense_attn["attention_mask"]
    assert mask.shape == (2, 1, 1, 30 + TXT + TXT2)  # [image, text]: the text's entries (its padding) all stay
    assert mask[..., :30].all() and torch.equal(mask[..., 30:], dense_mask[..., N:])

    def ff_only(counts: dict[str, list[int]]) -> None:
        assert counts == _counts(N, 30)

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _token_counts(model, kw),
                                         unmerged, ff_only, reapply=True)


def test_hunyuan_image_single_block_mlp_finds_the_matching_first() -> None:
    # proj_mlp runs before attn in a single-stream block: it computes the block's matching, which attn then reuses
    # (a stale one, from the block's previous call on other tokens, would merge the wrong tokens): a second input
    # merges as it does as the first call of a fresh merge
    model = _transformer()
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    _run(model, _inputs())
    second = _inputs(seed=1)
    second["timestep"] = torch.full((2,), 900.0)  # a rise: a new generation, its matchings computed afresh
    out = _run(model, second)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    torch.testing.assert_close(out, _run(model, second))
    remove_token_merging(model)


def test_hunyuan_image_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_hunyuan_image_batch_of_two_shares_one_matching() -> None:
    # the RoPE table has no batch axis: one matching, from the batch's mean tokens, for two different samples;
    # two copies of one sample merge as it alone would
    model = _transformer()
    contract.batch_shares_one_matching(model, model.transformer_blocks[0].attn, lambda kw: _run(model, kw), _inputs())


def test_hunyuan_image_refiner_latent_of_one_frame_merges() -> None:
    # the refiner's transformer takes (B, C, 1, H, W) latents with 3-D patches
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(0)
    model = HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1, 1), text_embed_dim=16,
        rope_axes_dim=(4, 6, 6)).eval()
    kw = _inputs()
    kw["hidden_states"] = kw["hidden_states"].unsqueeze(2)
    del kw["encoder_hidden_states_2"], kw["encoder_attention_mask_2"]
    assert merging_supports(model) is None
    dense = _run(model, kw)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    merged = _run(model, kw)
    assert merging_state(model).merged_tokens == 2 * 30 and not torch.equal(merged, dense)
    remove_token_merging(model)
    assert torch.equal(_run(model, kw), dense)


def _pipe_call() -> dict:
    return {"prompt": ["a cat", 'a big red dog saying "hi"'], "height": 32, "width": 48, "num_inference_steps": 3,
            "output_type": "np", "generator": torch.Generator().manual_seed(0)}


def test_hunyuan_image_pipeline_generations(caplog: pytest.LogCaptureFixture) -> None:
    contract.pipeline_generations(tiny_hunyuan_image(seed=0), _pipe_call, (2, 32, 48, 3), caplog)


def test_hunyuan_image_pipeline_reuses_matchings_between_recompute_steps(caplog: pytest.LogCaptureFixture) -> None:
    # hits: step 1 reuses step 0's matchings, 4 blocks, 2 guidance passes each; merged: 3 steps x 2 passes x 4
    # blocks x half of the 16x24 grid
    contract.pipeline_reuses_matchings(tiny_hunyuan_image(seed=0), _pipe_call, 8, 3 * 2 * 4 * 192, caplog)


def test_hunyuan_image_lora_on_single_proj_mlp_merges_in_either_order_and_after_unloading() -> None:
    """A single-stream block's ``proj_mlp`` is a ``Linear``, which peft's LoRA replaces by a wrapper (and unloading
    replaces back): the merging follows the module at ``block.proj_mlp``, as on FLUX.1."""
    contract.lora_follows_replaced_modules(_transformer, ["proj_mlp"], lambda m: _run(m, _inputs()),
                                           TokenMergingConfig(ratio=0.5), lambda m: m.single_transformer_blocks)
