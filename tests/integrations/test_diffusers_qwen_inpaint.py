"""Sparse Context on a tiny random-weight Qwen-Image-Edit inpainting pipeline (no text encoder).

``QwenImageEditInpaintPipeline`` feeds the QwenImage transformer ``[noisy target, source image]``
(``img_shapes`` = target grid, source grid): the unmasked source image is the one reference. The mask only
blends the source back into the latents after each step; it never reaches the transformer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from PIL import Image

import tokensparse as ts
from tokensparse.context import SparseContextConfig
from tokensparse.integrations.diffusers import (
    apply_sparse_context_diffusers,
    remove_sparse_context_diffusers,
    sparse_context_state,
)
from tokensparse.integrations.diffusers_tiny import qwen_call_kwargs, tiny_qwen_image_edit_inpaint

from .contract import edges_views, input_lengths, reapply_then_remove, refuses_proportional_and_cache

TOKENS = 8 * 8  # 32x32 images: VAE /2, 2x2 patches
SOURCE = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")
MASK = Image.fromarray((np.pad(np.ones((16, 16)), 8) * 255).astype("uint8"))


@pytest.fixture
def pipe(monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_inpaint as module

    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: (32, 32, None))  # not 1024^2
    p = tiny_qwen_image_edit_inpaint(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def lengths(pipe) -> list[int]:
    return input_lengths(pipe.transformer.img_in)


def run(pipe):
    return pipe(image=Image.fromarray(SOURCE), mask_image=MASK, strength=1.0,
                generator=torch.Generator().manual_seed(0), output_type="np", **qwen_call_kwargs()).images


def test_identity_sparse_remove_and_reapply(pipe):
    seen = lengths(pipe)
    dense = run(pipe)
    assert seen == [2 * TOKENS] * 4  # 2 steps x true CFG: target + source
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=1.0))
    assert np.array_equal(run(pipe), dense)
    seen.clear()
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    sparse = run(pipe)
    assert seen == [TOKENS + TOKENS // 4] * 4
    state = sparse_context_state(pipe)
    assert state.selections == 1
    (index, layout), = state.index.values()
    assert layout.grids == [(8, 8)] and (index[:TOKENS] == torch.arange(TOKENS)).all()  # the target is whole
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    reapply_then_remove(pipe, run, sparse, dense, [pipe.transformer, pipe.transformer.pos_embed])


def test_a_pixel_selector_scores_the_source_image(pipe, monkeypatch):
    seen = edges_views(monkeypatch, pipe, run)
    (view,) = seen  # one reference, one selection
    assert view.grid == (8, 8) and view.image.shape == (1, 3, 32, 32)
    assert np.abs(view.image[0].permute(1, 2, 0).numpy() - SOURCE / 255).max() < 0.01  # unmasked source pixels


def test_proportional_and_cache_are_refused(pipe):
    refuses_proportional_and_cache(pipe, "QwenDoubleStreamAttnProcessor2_0 refuses an external attention_mask")


def test_token_merging_on_the_target_stacks_with_sparse_context(pipe):
    dense = run(pipe)
    seen: list[int] = []
    ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
    for blk in pipe.transformer.transformer_blocks:  # after merging's hooks: sees the merged image stream
        blk.attn.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].shape[1]), with_kwargs=True)
    merged = run(pipe)
    assert seen == [TOKENS // 2 + TOKENS] * 8  # 2 blocks x 2 steps x true CFG: target halved, source whole
    assert np.isfinite(merged).all() and not np.array_equal(merged, dense)
    seen.clear()
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    assert np.isfinite(run(pipe)).all()
    assert seen == [TOKENS // 2 + TOKENS // 4] * 8
    ts.remove_token_merging(pipe)
    remove_sparse_context_diffusers(pipe)
    assert np.array_equal(run(pipe), dense)
