"""Token merging on Fibo 2.0 (``BriaFibo2Transformer2DModel``, ``BriaFibo2Pipeline``): the target grid merges in the
noise refiner (``[target, images to edit]``) and the main layers (``[gist, target, images to edit]``, or the gist last
when a batch pads it, with a key mask): attention (RoPE rows and key mask along), the injection blocks' cross-attention
queries (``merge_cross``) and feed-forward; the gist tokens and the images to edit never merge, and Sparse Context,
which thins the latter, stacks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_bria_fibo2")

from PIL import Image  # noqa: E402

import tokensparse as ts  # noqa: E402
from tokensparse.context import SparseContextConfig  # noqa: E402
from tokensparse.integrations.diffusers_tiny_fibo2 import tiny_bria_fibo2  # noqa: E402
from tokensparse.integrations.merging_hooks import merging_state, merging_supports  # noqa: E402

from . import merging_contract as contract  # noqa: E402

TOKENS = 8 * 8  # 16x16 latents, 2x2 patches (the pipeline's 32x32 images: VAE /2)
GIST = 8  # the tiny model's most gist tokens: a prompt of 64 text tokens or more gets them all
TEXT = 70
REF = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")


def _transformer() -> nn.Module:
    return tiny_bria_fibo2(seed=0).transformer  # 1 noise-refiner block, 2 main layers (the second an injection one)


def _inputs(batch: int = 2, text: tuple[int, ...] | None = None, smooth: bool = False, seed: int = 1) -> dict:
    """A target latent (8x8 tokens) and one image to edit (8x8 tokens); ``text``: each prompt's length, for a key
    mask over the text (lengths under 64 get fewer gist tokens: the batch then pads the gist and puts it last)."""
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 4, 4, 4, generator=g), size=(16, 16), mode="bilinear")
    else:
        x = torch.randn(batch, 4, 16, 16, generator=g)
    kw = {"hidden_states": x, "timestep": torch.full((batch,), 0.7),
          "encoder_hidden_states": torch.randn(batch, 2, TEXT, 48, generator=g),
          "context_latents": [torch.randn(batch, 4, 16, 16, generator=g)], "return_dict": False}
    if text is not None:
        kw["encoder_attention_mask"] = torch.arange(TEXT)[None] < torch.tensor(text)[:, None]
    return kw


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _token_counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    """Tokens each sublayer saw in one call: the refiner's and the main layers' attention and feed-forward, the
    injection block's cross-attention."""
    subs = [(f"{group}_{key}", getattr(blk, key)) for group in ("noise_refiner", "layers")
            for blk in getattr(model, group) for key in ("attention", "cross_attention", "feed_forward")
            if getattr(blk, key) is not None]
    return contract.tokens_seen(subs, lambda: _run(model, kw))


def _counts(attn: int, mlp: int, cross: int | None = None, gist: int = GIST) -> dict[str, list[int]]:
    """:func:`_token_counts` where the attention sees ``attn`` target tokens, the feed-forward ``mlp`` and the
    cross-attention ``cross`` (default: all of them); the image to edit and the gist always whole."""
    cross = TOKENS if cross is None else cross
    return {"noise_refiner_attention": [attn + TOKENS], "noise_refiner_feed_forward": [mlp + TOKENS],
            "layers_attention": [gist + attn + TOKENS] * 2, "layers_feed_forward": [gist + mlp + TOKENS] * 2,
            "layers_cross_attention": [gist + cross + TOKENS]}


def test_supported_and_merges_the_target_only_and_removes_exactly() -> None:
    model, kw = _transformer(), _inputs()
    assert merging_supports(model) is None
    dense = _run(model, kw)
    unmerged = _token_counts(model, kw)
    assert unmerged == _counts(TOKENS, TOKENS)
    ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
    assert _token_counts(model, kw) == _counts(TOKENS // 2, TOKENS // 2)  # gist, image to edit, queries: whole
    assert merging_state(model).merged_tokens == 3 * TOKENS // 2  # 3 blocks, a matching per sample

    def ff_only(counts: dict[str, list[int]]) -> None:
        assert counts == _counts(TOKENS, TOKENS // 2)

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _token_counts(model, kw),
                                         unmerged, ff_only, reapply=True)


def test_merge_cross_merges_the_injection_blocks_queries() -> None:
    model, kw = _transformer(), _inputs(text=(TEXT, 40))  # a text key mask: the cross-attention's, passed as it is
    ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5, merge_cross=True, merge_attn=False,
                                                        merge_mlp=False))
    mask = contract.call_kwargs(model.layers[1].cross_attention, lambda: _run(model, kw))["attention_mask"]
    assert torch.equal(mask, kw["encoder_attention_mask"])
    assert merging_state(model).merged_tokens == TOKENS // 2  # the one injection block
    assert _token_counts(model, kw) == _counts(TOKENS, TOKENS, cross=TOKENS // 2)
    ts.remove_token_merging(model)


def _attention_calls(model: nn.Module, kw: dict) -> list[tuple[object, dict]]:
    """The active matching and the keyword arguments of each self-attention call (refiner, then main layers), as a
    hook registered after merging's pre-hooks sees them."""
    seen: list[tuple[object, dict]] = []
    attns = [blk.attention for blk in (*model.noise_refiner, *model.layers)]
    handles = [a.register_forward_pre_hook(lambda m, a, k: seen.append((m.__dict__.get("_tokensparse_active"), k)),
                                           with_kwargs=True) for a in attns]
    _run(model, kw)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("text", [None, (TEXT, 5)], ids=["gist_first", "gist_padded_last"])
def test_rope_rows_and_key_mask_keep_the_gist_and_reference_entries(text) -> None:
    """Each sample's kept target tokens keep their own RoPE rows (and key-mask entries), in order; the gist's and the
    image to edit's all stay. Without a key mask the main layers' stream is ``[gist, target, image]``; prompts of
    different lengths get different gist counts (4 and 8), padded and put last, under a key mask."""
    model, kw = _transformer(), _inputs(text=text)
    dense = _attention_calls(model, kw)
    ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
    merged = _attention_calls(model, kw)
    ts.remove_token_merging(model)
    start = 0 if text else GIST
    for i, ((active, k), (_, dk)) in enumerate(zip(merged, dense)):
        lo = 0 if i == 0 else start  # the refiner's stream has no gist
        m, span = active
        n = dk["freqs_cis"].shape[1]
        assert span == (lo, TOKENS) and m.num_merged == TOKENS // 2 and m.batch_size == 2
        assert (dk["attention_mask"] is None) == (i == 0 or text is None)
        for b in range(2):
            keys = torch.cat([torch.arange(lo), lo + m.keep[b], torch.arange(lo + TOKENS, n)])
            assert torch.equal(k["freqs_cis"][b], dk["freqs_cis"][0, keys])
            if dk["attention_mask"] is not None:
                assert not dk["attention_mask"][1].all()  # the short prompt's padded gist tokens
                assert torch.equal(k["attention_mask"][b], dk["attention_mask"][b, keys])


def test_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_batch_samples_merge_as_each_alone() -> None:
    # the RoPE table, expanded to the batch: each sample gets its own matching, as it would alone
    model, kw = _transformer(), _inputs()

    def alone(i: int) -> Tensor:
        one = {k: v[i:i + 1] if isinstance(v, Tensor) else v for k, v in kw.items()}
        one["context_latents"] = [c[i:i + 1] for c in kw["context_latents"]]
        return _run(model, one)

    contract.batch_matches_each_sample_alone(model, lambda: _run(model, kw), alone)


@pytest.fixture
def pipe():
    p = tiny_bria_fibo2(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def _edit_call(steps: int = 3) -> dict:
    return {"prompt": "a cat", "image": Image.fromarray(REF), "height": 32, "width": 32, "num_inference_steps": steps,
            "guidance_scale": 2.0, "generator": torch.Generator().manual_seed(0), "output_type": "np"}


def test_edit_pipeline_generations(pipe, caplog) -> None:
    contract.pipeline_generations(pipe, _edit_call, (1, 32, 32, 3), caplog)


def test_text_to_image_pipeline_generations_batch_of_two_prompts(pipe, caplog) -> None:
    def call() -> dict:  # 8x12 tokens
        return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 32, "width": 48,
                "num_inference_steps": 3, "guidance_scale": 2.0, "output_type": "np",
                "generator": torch.Generator().manual_seed(0)}

    contract.pipeline_generations(pipe, call, (2, 32, 48, 3), caplog)


def test_pipeline_reuses_matchings_between_recompute_steps(pipe, caplog) -> None:
    # hits: step 1 reuses step 0's matchings, in each of the 3 blocks and both CFG passes (told apart by their
    # prompts); merged: 3 steps x 2 passes x 3 blocks x half of the 8x8 grid
    contract.pipeline_reuses_matchings(pipe, _edit_call, 2 * 3, 3 * 2 * 3 * TOKENS // 2, caplog)


def test_stacks_with_sparse_context_on_the_image_to_edit(pipe, caplog) -> None:
    model = pipe.transformer
    subs = [("attn", model.layers[0].attention), ("ff", model.layers[0].feed_forward)]
    unmerged = contract.tokens_seen(subs, lambda: pipe(**_edit_call(steps=2)))
    dense = pipe(**_edit_call(steps=2)).images
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
        ts.apply_sparse_context(pipe, SparseContextConfig(keep=0.25))
        seen = contract.tokens_seen(subs, lambda: pipe(**_edit_call(steps=2)))
        stacked = pipe(**_edit_call(steps=2)).images
    assert not contract.ours(caplog)
    # every call (2 steps x 2 CFG passes, each with its prompt's gist): half the target, a quarter of the image
    gone = TOKENS // 2 + TOKENS - TOKENS // 4
    assert len(unmerged["attn"]) == 4 and seen == {k: [n - gone for n in v] for k, v in unmerged.items()}
    assert np.isfinite(stacked).all() and not np.array_equal(stacked, dense)
    ts.remove_token_merging(pipe)
    ts.remove_sparse_context(pipe)
    assert np.array_equal(pipe(**_edit_call(steps=2)).images, dense)
