"""Sparse Context on a tiny random-weight Qwen-Image 2.1 pipeline (tiny Qwen3-VL text encoder, built offline).

``QwenImage21Transformer2DModel`` writes the condition images' latent tokens into their ``<|image_pad|>`` slots of
the prompt (``img_mask``) and appends the target's, one joint sequence whose RoPE rows, block-causal mask, target
mask, padding mask and prefix K/V cache it derives itself. Companion hooks on its blocks and ``norm_out`` thin
every one of them; the pipeline's K/V cache (on by default) then holds the kept prefix only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image

from tokensparse.context import SparseContextConfig
from tokensparse.integrations.diffusers import (
    apply_sparse_context_diffusers,
    remove_sparse_context_diffusers,
    sparse_context_state,
)
from tokensparse.integrations.diffusers_tiny_qwen21 import tiny_qwen_image21

from .contract import (
    assert_checkpointing_is_exact,
    first_call,
    pipe_fixtures,
    reapply_then_remove,
    refuses_proportional_and_cache,
)

TOKENS = 8 * 8  # 128x128 images at output_resolution 128: 16 pixels per token
REF = (np.random.RandomState(0).rand(128, 128, 3) * 255).astype("uint8")


pipe, clean = pipe_fixtures(tiny_qwen_image21)


class Seen:
    """Per call of the first block (a pre-hook registered after Sparse Context's): tokens, K/V mode, and the prefix
    the K/V cache holds at cached calls."""

    def __init__(self, pipe) -> None:
        self.calls: list[tuple[int, str | None, int | None]] = []
        self.handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs) -> None:
        cache = kwargs["layer_cache"]
        held = cache.k.shape[1] if kwargs["kv_cache_mode"] == "cached" else None
        self.calls.append((kwargs["hidden_states"].shape[1], kwargs["kv_cache_mode"], held))


def refs(n: int) -> list[Image.Image]:
    return [Image.fromarray(REF)] + [Image.fromarray(np.roll(REF, 9 * i, 1)).resize((192, 96)) for i in range(1, n)]


def run(pipe, image=None, prompt="a cat", kv=True, **kwargs):
    image = refs(1) if image is None else image
    return pipe(prompt, image=image or None, output_resolution=128, num_inference_steps=3, use_kv_cache=kv,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def test_identity_sparse_cache_remove_and_reapply(pipe):
    seen = Seen(pipe)
    dense = run(pipe)
    seen.handle.remove()
    (joint, _, _), (_, _, prefix) = seen.calls[:2]  # the extract call's joint sequence; the prefix it cached
    assert seen.calls == [(joint, "extract", None)] + [(TOKENS, "cached", prefix)] * 2 and joint == prefix + TOKENS
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=1.0))
    assert np.array_equal(run(pipe), dense)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    seen = Seen(pipe)
    sparse = run(pipe)
    seen.handle.remove()
    dropped = TOKENS - TOKENS // 4
    # the extract step runs the kept joint sequence and caches its prefix; cached steps run the target alone
    assert seen.calls == [(joint - dropped, "extract", None)] + [(TOKENS, "cached", prefix - dropped)] * 2
    state = sparse_context_state(pipe)
    assert state.selections == 1  # the extract and cached calls share it
    (index, layout), = state.index.values()
    assert layout.grids == [(8, 8)] and (index[-TOKENS:] == torch.arange(TOKENS, 2 * TOKENS)).all()  # target last
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    hooked = [pipe.transformer, *pipe.transformer.transformer_blocks, pipe.transformer.norm_out]
    reapply_then_remove(pipe, run, sparse, dense, hooked)


def test_cached_and_uncached_agree_with_several_images_padded_prompts_and_cfg(pipe):
    # two prompts of different lengths: a text padding mask (key_valid, the cached steps' attention_mask) to thin
    call = {"image": refs(2), "prompt": ["a cat", "a dog on a hill"], "negative_prompt": ["bad", "worse, blurry"],
            "true_cfg_scale": 2.0}
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    seen = Seen(pipe)
    cached = run(pipe, **call)
    seen.handle.remove()
    uncached = run(pipe, kv=False, **call)
    (index, layout), = sparse_context_state(pipe).index.values()
    assert layout.grids == [(8, 8), (6, 12)]  # the output takes the last image's aspect: 6x12 tokens too
    assert index.numel() == 72 + round(0.25 * 64) + round(0.25 * 72)
    assert [mode for _, mode, _ in seen.calls] == ["extract"] * 2 + ["cached"] * 4  # prompt and negative
    assert cached.shape == (2, 96, 192, 4) and np.isfinite(cached).all()
    np.testing.assert_allclose(cached, uncached, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
def test_kept_tokens_keep_their_positions(pipe):
    # the sparse transformer = the dense one whose attention ignores the dropped tokens as keys (every other
    # operation is per token): holds only if each kept token keeps its RoPE row, block, mask and modulation row
    from diffusers.models.transformers.transformer_qwenimage21 import (
        QwenImage21AttnProcessor,
        QwenImage21FlexAttnProcessor,
    )

    tr = pipe.transformer
    g = torch.Generator().manual_seed(1)
    slots = [0] * 3 + [1] * 4 + [0] * 2 + [1] * 3 + [0] + [1] * 4  # text, image 1, text, image 2, text, target
    call = {"hidden_states": torch.randn(1, 16 + 12 + 16, 4, generator=g), "timestep": torch.tensor([0.6]),
            "encoder_hidden_states": torch.randn(1, 13, 16, generator=g), "img_shapes": [[(1, 4, 4), (1, 2, 6),
                                                                                           (1, 4, 4)]],
            "img_mask": torch.tensor([slots], dtype=torch.bool), "return_dict": False}
    is_image = torch.repeat_interleave(torch.tensor(slots, dtype=torch.bool), torch.tensor(slots) * 3 + 1)
    with torch.no_grad():
        dense = tr(**call)[0]
        apply_sparse_context_diffusers(tr, SparseContextConfig(keep=0.25, seed=3))
        sparse = tr(**call)[0]
        blocks = tr.transformer_blocks
        for block in blocks:
            block.attn.set_processor(QwenImage21FlexAttnProcessor())  # a BlockMask over the kept tokens
        try:
            flex = tr(**call)[0]
        finally:
            for block in blocks:
                block.attn.set_processor(QwenImage21AttnProcessor())
        (index, layout), = sparse_context_state(tr).index.values()
        remove_sparse_context_diffusers(tr)
        assert layout.grids == [(4, 4), (2, 6)] and index.numel() == 4 + 3 + 16
        keep = ~is_image
        keep[torch.nonzero(is_image).squeeze(1)[index]] = True

        def drop_keys(module, args, kwargs):
            kwargs["key_valid"] = keep[None] if kwargs["key_valid"] is None else kwargs["key_valid"] & keep
            return args, kwargs

        handles = [block.register_forward_pre_hook(drop_keys, with_kwargs=True) for block in blocks]
        try:
            masked = tr(**call)[0]
        finally:
            for handle in handles:
                handle.remove()
    assert sparse.shape == dense.shape == (1, keep.numel(), 4)
    assert not sparse[:, ~keep].any() and not torch.allclose(sparse[:, keep], dense[:, keep], atol=1e-4)
    torch.testing.assert_close(sparse[:, keep], masked[:, keep], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(flex, sparse, atol=2e-5, rtol=1e-4)


def test_a_cache_filled_by_another_selection_is_refused(pipe):
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    tr = pipe.transformer
    g = torch.Generator().manual_seed(2)
    call = {"hidden_states": torch.randn(1, 32, 4, generator=g), "encoder_hidden_states": torch.randn(1, 6, 16),
            "img_shapes": [[(1, 4, 4), (1, 4, 4)]], "img_mask": torch.tensor([[0, 1, 1, 1, 1, 0, 1, 1, 1, 1]]).bool(),
            "kv_cache": QwenImage21KVCache(len(tr.transformer_blocks)), "return_dict": False}
    with torch.no_grad():
        tr(**call, timestep=torch.tensor([0.9]), kv_cache_mode="extract")  # dense: the whole prefix cached
        apply_sparse_context_diffusers(tr, SparseContextConfig(keep=0.25))
        with pytest.raises(ValueError, match="filled by a call with another selection"):
            tr(**call, timestep=torch.tensor([0.8]), kv_cache_mode="cached")


def test_gradient_checkpointing_recomputes_blocks_over_the_kept_tokens(pipe):
    # a checkpointed block runs again in backward, after its call ended: it must get the kept tokens' rows its
    # forward got (it got the dense ones: a size mismatch in backward)
    args, kwargs = first_call(pipe, lambda p: run(p, image=refs(2), kv=False))
    noise = torch.randn(kwargs["hidden_states"].shape, generator=torch.Generator().manual_seed(1))
    calls = [(args, kwargs), (args, {**kwargs, "hidden_states": kwargs["hidden_states"] + noise})]  # other images
    assert_checkpointing_is_exact(pipe.transformer, calls)


def test_text_to_image_is_left_dense(pipe):
    dense = run(pipe, image=[])
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    assert np.array_equal(run(pipe, image=[]), dense)


def test_pixel_scorers_get_the_images_rgb(pipe):
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="edges"))
    run(pipe, image=refs(2))
    state = sparse_context_state(pipe)  # the pipeline hands its VAE RGBA pixels: the scorers get the RGB
    assert state.images is not None and [x.shape for x in state.images] == [(1, 3, 128, 128), (1, 3, 96, 192)]
    want = torch.from_numpy(REF.astype(np.float32) / 255).permute(2, 0, 1)[None]
    torch.testing.assert_close(state.images[0], want, atol=1e-6, rtol=0)


def test_proportional_and_cache_are_refused(pipe):
    refuses_proportional_and_cache(
        pipe, proportional="QwenImage21Transformer2DModel .its attention processors get only",
        cache="has a text and reference K/V cache of its own .use_kv_cache=True")
