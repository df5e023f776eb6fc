"""Sparse Context and token merging on a tiny random-weight LongCat-Image-Edit pipeline (tiny Qwen2.5-VL text
encoder, built offline).

``LongCatImageEditPipeline`` feeds its transformer ``[noisy target, reference]`` with FLUX-style
``img_ids`` = (modality, H, W): the target has modality 1, the reference 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image

import tokensparse as ts
from tokensparse.context import SparseContextConfig
from tokensparse.integrations.diffusers import (
    apply_sparse_context_diffusers,
    remove_sparse_context_diffusers,
    sparse_context_state,
)
from tokensparse.integrations.diffusers_tiny import tiny_longcat_image_edit
from tokensparse.integrations.merging_hooks import merging_state

from .contract import edges_views, input_lengths, reapply_then_remove, refuses_proportional_and_cache

TOKENS = 8 * 8  # 32x32 images: VAE /2, 2x2 patches
REF = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")


@pytest.fixture
def pipe(monkeypatch):
    import diffusers.pipelines.longcat_image.pipeline_longcat_image_edit as module

    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: (32, 32))  # not 1024^2
    p = tiny_longcat_image_edit(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def lengths(pipe) -> list[int]:
    return input_lengths(pipe.transformer.x_embedder)


def run(pipe, prompt="a cat"):
    return pipe(image=Image.fromarray(REF), prompt=prompt, num_inference_steps=2, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_identity_sparse_remove_and_reapply(pipe):
    seen = lengths(pipe)
    dense = run(pipe)
    assert seen == [2 * TOKENS] * 4  # 2 steps x CFG: target + reference
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=1.0))
    assert np.array_equal(run(pipe), dense)
    seen.clear()
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    sparse = run(pipe)
    assert seen == [TOKENS + TOKENS // 4] * 4
    state = sparse_context_state(pipe)
    assert state.selections == 1 and state.prompts == ["a cat"]  # not the negative prompt "", encoded after it
    (index, layout), = state.index.values()
    assert layout.grids == [(8, 8)] and (index[:TOKENS] == torch.arange(TOKENS)).all()  # the target is whole
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    reapply_then_remove(pipe, run, sparse, dense, [pipe.transformer])


def test_a_pixel_selector_scores_the_reference_image(pipe, monkeypatch):
    seen = edges_views(monkeypatch, pipe, run)
    (view,) = seen  # one reference, one selection
    assert view.grid == (8, 8) and view.image.shape == (1, 3, 32, 32)
    assert np.abs(view.image[0].permute(1, 2, 0).numpy() - REF / 255).max() < 0.01


def _call(ref: bool = True) -> dict:
    """A bare LongCat call: an 8x8 target (modality 1) and, with ``ref``, an 8x8 reference (modality 2)."""
    g = torch.Generator().manual_seed(0)
    n = 2 * TOKENS if ref else TOKENS
    ids = torch.cat([torch.cartesian_prod(torch.tensor([t]), torch.arange(8) + 4, torch.arange(8) + 4)
                     for t in ((1, 2) if ref else (1,))]).double()  # H, W offset by the text length, as the pipeline
    return {
        "hidden_states": torch.randn(1, n, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, 4, 16, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": ids,
        "txt_ids": torch.stack([torch.zeros(4), torch.arange(4.0), torch.arange(4.0)], dim=1),  # modality 0
        "return_dict": False,
    }


@torch.no_grad()
def test_kept_tokens_keep_their_position_ids_and_a_call_without_reference_is_unchanged(pipe):
    tr = pipe.transformer
    kw = _call()
    apply_sparse_context_diffusers(tr, SparseContextConfig(keep=0.25, selector="random", seed=5))
    sparse = tr(**kw)[0]
    t2i = _call(ref=False)  # the target alone (as LongCatImagePipeline calls it): a no-op
    patched_t2i = tr(**t2i)[0]
    remove_sparse_context_diffusers(tr)
    assert torch.equal(patched_t2i, tr(**t2i)[0])
    index = torch.nonzero(sparse[0].abs().sum(-1) != 0).squeeze(1)
    assert len(index) == TOKENS + TOKENS // 4 and (index[:TOKENS] == torch.arange(TOKENS)).all()
    expected = tr(**dict(kw, hidden_states=kw["hidden_states"][:, index], img_ids=kw["img_ids"][index]))[0]
    torch.testing.assert_close(sparse[:, index], expected, rtol=0, atol=0)


def test_proportional_and_cache_are_refused(pipe):
    refuses_proportional_and_cache(pipe, "takes no joint_attention_kwargs")


def image_lengths(tr) -> tuple[list[int], list[int], list[int]]:
    """Image-stream and text tokens of every double-stream attention call, and [text, image] tokens of every
    single-stream one (registered after merging's hooks: they see the merged inputs)."""
    double: list[int] = []
    text: list[int] = []
    single: list[int] = []
    for blk in tr.transformer_blocks:
        blk.attn.register_forward_pre_hook(lambda m, a, k: double.append(k["hidden_states"].shape[1])
                                           or text.append(k["encoder_hidden_states"].shape[1]), with_kwargs=True)
    for blk in tr.single_transformer_blocks:
        blk.attn.register_forward_pre_hook(lambda m, a, k: single.append(k["hidden_states"].shape[1]),
                                           with_kwargs=True)
    return double, text, single


def test_token_merging_merges_the_target_only_and_remove_restores(pipe):
    dense = run(pipe)
    tr = pipe.transformer
    ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
    state = merging_state(tr)
    double, text, single = image_lengths(tr)
    merged = run(pipe)
    calls = 4  # 2 steps x CFG
    assert double == [TOKENS // 2 + TOKENS] * calls * len(tr.transformer_blocks)  # target halved, reference whole
    n_txt = text[0]  # text tokens: never merged (single-stream blocks see [text, merged target, reference])
    assert n_txt > 0 and single == [n_txt + TOKENS // 2 + TOKENS] * calls * len(tr.single_transformer_blocks)
    assert state.merged_tokens > 0
    assert np.isfinite(merged).all() and not np.array_equal(merged, dense)
    ts.remove_token_merging(pipe)
    assert np.array_equal(run(pipe), dense)


@torch.no_grad()
def test_token_merging_on_bare_calls_with_and_without_reference(pipe):
    tr = pipe.transformer
    kw = _call()
    ts.apply_token_merging(tr, ts.TokenMergingConfig(ratio=0.5))
    merged = tr(**kw)[0]
    ts.remove_token_merging(tr)
    dense = tr(**kw)[0]
    assert merged.shape == dense.shape == (1, 2 * TOKENS, 64) and torch.isfinite(merged).all()
    assert not torch.equal(merged[:, :TOKENS], dense[:, :TOKENS])
    t2i = _call(ref=False)  # the target alone (modality 1, as LongCatImagePipeline calls it) merges too
    ts.apply_token_merging(tr, ts.TokenMergingConfig(ratio=0.5))
    state = merging_state(tr)
    before = state.merged_tokens
    tr(**t2i)
    assert state.merged_tokens > before
    ts.remove_token_merging(tr)


def test_token_merging_stacks_with_sparse_context(pipe):
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    sparse = run(pipe)
    ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
    double, _, _ = image_lengths(pipe.transformer)
    stacked = run(pipe)
    assert double == [TOKENS // 2 + TOKENS // 4] * 4 * len(pipe.transformer.transformer_blocks)
    assert np.isfinite(stacked).all() and not np.array_equal(stacked, sparse)
    ts.remove_token_merging(pipe)
    assert np.array_equal(run(pipe), sparse)
    remove_sparse_context_diffusers(pipe)
