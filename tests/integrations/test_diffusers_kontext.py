"""Sparse Context on a tiny random-weight FLUX.1 Kontext pipeline (saved and reloaded from a temp dir)."""

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
from tokensparse.integrations.diffusers_tiny import kontext_call_kwargs, tiny_flux_kontext

from .contract import input_lengths, reapply_then_remove
from .proportional import assert_bias_is_duplication, keep_one_then_plain_sparse

TOKENS = 8 * 8  # 32x32 target and reference


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("kontext") / "pipe"
    tiny_flux_kontext(seed=0).save_pretrained(path)
    return path


@pytest.fixture
def pipe(saved_dir):
    from diffusers import DiffusionPipeline

    p = DiffusionPipeline.from_pretrained(saved_dir)
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, prompt="a cat", ref=True):
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")) if ref else None
    return pipe(
        image=image,
        prompt=prompt,
        negative_prompt="blur" if isinstance(prompt, str) else ["blur"] * len(prompt),
        true_cfg_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kontext_call_kwargs(),
    ).images


def lengths(pipe) -> list[int]:
    return input_lengths(pipe.transformer.x_embedder)


def test_identity_sparse_remove_and_reapply(pipe):
    assert type(pipe).__name__ == "FluxKontextPipeline"
    seen = lengths(pipe)
    dense = run(pipe)
    assert seen == [2 * TOKENS] * 4  # 2 steps x true-CFG (two passes)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=1.0))
    assert np.array_equal(run(pipe), dense)
    seen.clear()
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    sparse = run(pipe)
    assert seen == [TOKENS + TOKENS // 4] * 4
    assert sparse_context_state(pipe).selections == 1
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    reapply_then_remove(pipe, run, sparse, dense, [pipe.transformer])


def test_batch_of_two_and_no_reference(pipe):
    seen = lengths(pipe)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.5, selector="uniform"))
    images = run(pipe, prompt=["a cat", "a dog"])
    assert images.shape[0] == 2 and np.isfinite(images).all()
    assert seen == [TOKENS + TOKENS // 2] * 4
    assert sparse_context_state(pipe).images[0].shape == (1, 3, 32, 32)
    seen.clear()
    run(pipe, ref=False)  # text-to-image with the Kontext pipeline: a no-op
    assert seen == [TOKENS] * 4


def _kontext_kwargs() -> dict:
    """A bare FLUX.1 Kontext call: an 8x8 target (T 0) and an 8x8 reference (T 1), random tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.cat(
        [torch.cartesian_prod(torch.tensor([t]), torch.arange(8), torch.arange(8)) for t in (0, 1)]
    ).float()
    return {
        "hidden_states": torch.randn(1, 2 * TOKENS, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, 4, 16, generator=g),
        "pooled_projections": torch.randn(1, 16, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": ids,
        "txt_ids": torch.zeros(4, 3),
        "return_dict": False,
    }


def test_kept_tokens_keep_their_position_ids(pipe):
    tr = pipe.transformer
    kw = _kontext_kwargs()
    ids = kw["img_ids"]
    apply_sparse_context_diffusers(tr, SparseContextConfig(keep=0.25, selector="random", seed=5))
    with torch.no_grad():
        sparse = tr(**kw)[0]
    remove_sparse_context_diffusers(tr)
    index = torch.nonzero(sparse[0].abs().sum(-1) != 0).squeeze(1)
    assert len(index) == TOKENS + TOKENS // 4 and (index[:TOKENS] == torch.arange(TOKENS)).all()
    with torch.no_grad():
        expected = tr(**dict(kw, hidden_states=kw["hidden_states"][:, index], img_ids=ids[index]))[0]
    torch.testing.assert_close(sparse[:, index], expected, rtol=0, atol=0)


def test_batch_with_different_references_warns_once(pipe, caplog):
    import logging

    images = [Image.fromarray((np.random.RandomState(s).rand(32, 32, 3) * 255).astype("uint8")) for s in (0, 1)]
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    with caplog.at_level(logging.WARNING, logger="tokensparse.integrations.diffusers"):
        run(pipe, prompt=["a cat", "a dog"])  # one image for both samples: nothing to warn about
        assert "different references" not in caplog.text
        for _ in range(2):
            pipe(image=images, prompt=["a cat", "a dog"], generator=torch.Generator().manual_seed(0),
                 output_type="np", **kontext_call_kwargs())
    assert caplog.text.count("different references") == 1


def test_inpaint_pipeline_scores_the_reference_not_the_source(pipe):
    """FluxKontextInpaintPipeline: the in-context image is ``image_reference`` when given, else the source."""
    from diffusers import FluxKontextInpaintPipeline

    inpaint = FluxKontextInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    src, ref = (np.random.RandomState(s).rand(32, 32, 3) for s in (0, 1))
    mask = Image.fromarray((np.pad(np.ones((16, 16)), 8) * 255).astype("uint8"))
    seen = lengths(inpaint)

    def call(**kw):
        return inpaint(image=Image.fromarray((src * 255).astype("uint8")), mask_image=mask, prompt="a cat",
                       strength=1.0, generator=torch.Generator().manual_seed(0), output_type="np",
                       **kontext_call_kwargs(), **kw).images

    reference = {"image_reference": Image.fromarray((ref * 255).astype("uint8"))}
    dense = call(**reference)
    apply_sparse_context_diffusers(inpaint, SparseContextConfig(keep=0.25))
    seen.clear()
    sparse = call(**reference)
    assert seen == [TOKENS + TOKENS // 4] * 2 and not np.array_equal(sparse, dense)
    captured = sparse_context_state(inpaint).images[0][0].permute(1, 2, 0).numpy()
    assert np.abs(captured - ref).max() < 0.01 < np.abs(captured - src).max()
    call()  # no image_reference: the source image is the context
    captured = sparse_context_state(inpaint).images[0][0].permute(1, 2, 0).numpy()
    assert np.abs(captured - src).max() < 0.01
    remove_sparse_context_diffusers(inpaint)
    assert np.array_equal(call(**reference), dense)


def test_token_merging_stacks_with_sparse_context(pipe):
    # Kontext appends the reference tokens (T id 1) after the target: merging takes the target grid only
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    sparse = run(pipe)
    ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
    seen: list[int] = []
    pipe.transformer.transformer_blocks[0].attn.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["hidden_states"].shape[1]), with_kwargs=True)
    stacked = run(pipe)
    assert seen == [TOKENS // 2 + TOKENS // 4] * 4  # merged target + kept reference tokens
    assert np.isfinite(stacked).all() and not np.array_equal(stacked, sparse)
    ts.remove_token_merging(pipe)
    assert np.array_equal(run(pipe), sparse)


@torch.no_grad()
def test_proportional_bias_equals_duplicated_tokens(pipe):
    kw = _kontext_kwargs()
    assert_bias_is_duplication(pipe.transformer, kw, kw["img_ids"], refs=(1,))


def test_proportional_keep_one_identical_bias_in_every_block_and_remove_restores(pipe):
    rec, dense, plain = keep_one_then_plain_sparse(pipe, run)
    biased = run(pipe)
    (sizes, bias), = sparse_context_state(pipe).sizes.values()
    assert torch.equal(sizes[:TOKENS], torch.ones(TOKENS)) and float(sizes[TOKENS:].sum()) == TOKENS
    assert len(rec.masks) == 4 * rec.blocks  # 2 steps x true-CFG (two passes) x every block
    for mask, keys in zip(rec.masks, rec.keys):
        assert mask.shape == (1, 1, 1, keys) and torch.equal(mask[0, 0, 0, -len(bias):], bias)
        assert not mask[0, 0, 0, :-len(bias)].any()  # text tokens: no bias
    assert np.isfinite(biased).all() and not np.array_equal(biased, plain)
    remove_sparse_context_diffusers(pipe)
    assert np.array_equal(run(pipe), dense)
