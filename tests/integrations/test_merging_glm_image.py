"""Token merging on GLM-Image (``GlmImageTransformer2DModel``, ``GlmImagePipeline``): CogView4's blocks, merged the
same way (every block's image stream in ``attn1`` with its RoPE rows, one matching for the batch, and the image call
of ``ff``); the text stream never, and the condition images' K/V-cache write calls run unmerged (references: Sparse
Context thins them, and the two stack)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_glm_image")

from PIL import Image  # noqa: E402

import tokensparse as ts  # noqa: E402
from tokensparse.context import SparseContextConfig  # noqa: E402
from tokensparse.integrations.diffusers_tiny_glm_image import (  # noqa: E402
    PRIOR_CODES,
    glm_image_call_kwargs,
    tiny_glm_image,
)
from tokensparse.integrations.merging_hooks import merging_state, merging_supports  # noqa: E402

from . import merging_contract as contract  # noqa: E402

TOKENS = 8 * 8  # 16x16 latents (the pipeline's 32x32 images), 2x2 patches
TEXT = 6


def _transformer() -> nn.Module:
    return tiny_glm_image(seed=0).transformer  # 2 blocks, dim 16


def _inputs(batch: int = 2, smooth: bool = False, seed: int = 1) -> dict:
    """A denoising call without condition images: latents ``(B, 4, 16, 16)`` (8x8 tokens), 6 glyph-text tokens, prior
    tokens."""
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 4, 4, 4, generator=g), size=(16, 16), mode="bilinear")
    else:
        x = torch.randn(batch, 4, 16, 16, generator=g)
    return {"hidden_states": x, "encoder_hidden_states": torch.randn(batch, TEXT, 16, generator=g),
            "prior_token_id": torch.randint(0, PRIOR_CODES, (batch, TOKENS), generator=g),
            "prior_token_drop": torch.zeros(batch, TOKENS, dtype=torch.bool), "timestep": torch.full((batch,), 700.0),
            "target_size": torch.tensor([[32.0, 32.0]] * batch), "crop_coords": torch.zeros(batch, 2),
            "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _token_counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    """Tokens each block's ``attn1`` (image stream) and ``ff`` (image, then text call) saw in one call."""
    blk = model.transformer_blocks
    return contract.tokens_seen([("attn1", b.attn1) for b in blk] + [("ff", b.ff) for b in blk],
                                lambda: _run(model, kw))


def test_supported_merges_the_image_stream_only_and_removes_exactly() -> None:
    model, kw = _transformer(), _inputs()
    assert merging_supports(model) is None
    dense = _run(model, kw)
    unmerged = _token_counts(model, kw)
    assert unmerged == {"attn1": [TOKENS] * 2, "ff": [TOKENS, TEXT] * 2}
    dense_kw = contract.call_kwargs(model.transformer_blocks[0].attn1, lambda: _run(model, kw))
    ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
    assert _token_counts(model, kw) == {"attn1": [TOKENS // 2] * 2, "ff": [TOKENS // 2, TEXT] * 2}
    assert merging_state(model).merged_tokens == 2 * TOKENS // 2  # 2 blocks, one matching for the batch
    seen: list = []  # registered after merging's pre-hook: its active matching and the merged call
    handle = model.transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda m, a, k: seen.append((m.__dict__["_tokensparse_active"], k)), with_kwargs=True)
    _run(model, kw)
    handle.remove()
    (m, span), merged_kw = seen[0]
    assert span == (0, TOKENS) and torch.equal(merged_kw["encoder_hidden_states"], dense_kw["encoder_hidden_states"])
    for table, dense_table in zip(merged_kw["image_rotary_emb"], dense_kw["image_rotary_emb"]):
        assert torch.equal(table, dense_table[m.keep[0]])  # each kept token its own row

    def ff_only(counts: dict[str, list[int]]) -> None:
        assert counts == {"attn1": [TOKENS] * 2, "ff": [TOKENS // 2, TEXT] * 2}

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _token_counts(model, kw),
                                         unmerged, ff_only, reapply=True)


def test_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_batch_shares_one_matching() -> None:
    # the RoPE table has no batch axis: one matching, from the batch's mean tokens, serves the batch
    model, kw = _transformer(), _inputs()
    contract.batch_shares_one_matching(model, model.transformer_blocks[0].attn1, lambda k: _run(model, k), kw)


def _ref(i: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(i).rand(32, 32, 3) * 255).astype("uint8"))


@pytest.fixture
def pipe():
    p = tiny_glm_image(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def _attn_calls(pipe, call: dict) -> list[tuple[str | None, int, int | None]]:
    """Per call of the first block's ``attn1`` in one generation: its K/V-cache mode, the image tokens it saw and, in
    read mode, the condition image's cached tokens."""
    seen: list[tuple[str | None, int, int | None]] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs["kv_cache"]
        cached = cache.k_caches[0].shape[1] if cache.mode == "read" else None
        seen.append((cache.mode, kwargs["hidden_states"].shape[1], cached))

    handle = pipe.transformer.transformer_blocks[0].attn1.register_forward_pre_hook(record, with_kwargs=True)
    pipe(prompt="a cat", **call)
    handle.remove()
    return seen


def test_condition_image_writes_run_unmerged_and_stack_with_sparse_context(pipe, caplog) -> None:
    call = glm_image_call_kwargs([_ref()], steps=2)
    dense = pipe(prompt="a cat", **glm_image_call_kwargs([_ref()], steps=2)).images
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
        # the write call (the condition image alone, timestep 0) whole; each step's read (conditional) and skip
        # (unconditional) calls merge their target, the read ones after the condition image's whole cached K/V
        step = [("read", TOKENS // 2, TOKENS), ("skip", TOKENS // 2, None)]
        assert _attn_calls(pipe, glm_image_call_kwargs([_ref()], steps=2)) == [("write", TOKENS, None)] + step * 2
        assert merging_state(pipe).step == 1  # the write call is no step of the generation
        ts.apply_sparse_context(pipe, SparseContextConfig(keep=0.25))
        stacked = _attn_calls(pipe, call)
        step = [("read", TOKENS // 2, TOKENS // 4), ("skip", TOKENS // 2, None)]
        assert stacked == [("write", TOKENS // 4, None)] + step * 2  # the condition image thinned, the target merged
    assert not contract.ours(caplog)  # no "merged nothing" for the write calls
    ts.remove_token_merging(pipe)
    ts.remove_sparse_context(pipe)
    assert np.array_equal(pipe(prompt="a cat", **glm_image_call_kwargs([_ref()], steps=2)).images, dense)


@pytest.mark.parametrize("image", [False, True], ids=["text_to_image", "edit"])
def test_pipeline_generations(pipe, caplog, image) -> None:
    def call() -> dict:
        return {"prompt": "a cat", **glm_image_call_kwargs([_ref()] if image else None, steps=3)}

    contract.pipeline_generations(pipe, call, (1, 32, 32, 3), caplog)


def test_pipeline_reuses_matchings_between_recompute_steps(pipe, caplog) -> None:
    # hits: step 1 reuses step 0's matchings in each of the 2 blocks, for both CFG passes (told apart by their
    # arguments); merged: 3 steps x 2 passes x 2 blocks x half of the 8x8 grid; the write call merges nothing
    def call() -> dict:
        return {"prompt": "a cat", **glm_image_call_kwargs([_ref()], steps=3)}

    contract.pipeline_reuses_matchings(pipe, call, 2 * 2, 3 * 2 * 2 * TOKENS // 2, caplog)
