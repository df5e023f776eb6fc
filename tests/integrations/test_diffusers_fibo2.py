"""Sparse Context on a tiny random-weight Fibo 2.0 pipeline (tiny Qwen3-VL text encoder, built offline).

``BriaFibo2Transformer2DModel`` takes the target as ``hidden_states (B, C, H, W)`` and the images to edit as
``context_latents``; it patchifies them into ``[target, image 1, ...]`` and places each token with RoPE ids it makes
itself. The Sparse Context hook thins that sequence at ``x_embedder`` and the ids at ``rope_embedder``.
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
from tokensparse.integrations.diffusers_fibo2 import KeptIds
from tokensparse.integrations.diffusers_tiny_fibo2 import tiny_bria_fibo2

from .contract import pipe_fixtures, reapply_then_remove, refuses_proportional_and_cache

TOKENS = 8 * 8  # 32x32 images: VAE /2, 2x2 patches
REF = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")


pipe, clean = pipe_fixtures(tiny_bria_fibo2)


def patches_seen(pipe) -> tuple[list[tuple[int, int]], object]:
    """(batch, tokens) of every x_embedder call, as a hook registered after Sparse Context's sees them."""
    seen: list[tuple[int, int]] = []
    handle = pipe.transformer.x_embedder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:2]))
    return seen, handle


def refs(n: int) -> list[Image.Image]:
    """``n`` images to edit: the first square, the others wider (the pipeline sizes each from its own aspect)."""
    return [Image.fromarray(REF)] + [Image.fromarray(np.roll(REF, 7 * i, 0)).resize((48, 32)) for i in range(1, n)]


def run(pipe, image=None, prompt="a cat"):
    image = refs(1) if image is None else image
    return pipe(prompt, image=image or None, height=32, width=32, num_inference_steps=2, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_identity_sparse_remove_and_reapply(pipe):
    dense = run(pipe)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=1.0))
    assert np.array_equal(run(pipe), dense)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    seen, handle = patches_seen(pipe)
    sparse = run(pipe)
    handle.remove()
    assert seen == [(1, TOKENS + TOKENS // 4)] * 4  # 2 steps x (prompt, negative prompt): target + a quarter
    state = sparse_context_state(pipe)
    assert state.selections == 1
    (index, layout), = state.index.values()
    assert layout.grids == [(8, 8)] and (index[:TOKENS] == torch.arange(TOKENS)).all()
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    assert isinstance(pipe.transformer.rope_embedder, KeptIds)
    reapply_then_remove(pipe, run, sparse, dense, [pipe.transformer, pipe.transformer.x_embedder])
    assert not isinstance(pipe.transformer.rope_embedder, KeptIds)  # the original is back


def test_text_to_image_is_left_dense(pipe):
    dense = run(pipe, image=[])
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    assert np.array_equal(run(pipe, image=[]), dense)


def test_kept_tokens_keep_their_positions(pipe):
    # the sparse transformer = the dense one whose image self-attention ignores the dropped tokens as keys: every
    # other operation is per token, so this holds only if each kept token keeps its own RoPE row and noise mask
    from diffusers.models.transformers.transformer_bria_fibo2 import BriaFibo2AttnProcessor

    class DropKeys(BriaFibo2AttnProcessor):
        def __init__(self, keep: torch.Tensor) -> None:
            self.keep = keep  # (N,) over [target, images]

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
            if encoder_hidden_states is None and freqs_cis is not None:  # the image stream (gist tokens first)
                gist = hidden_states.shape[1] - self.keep.numel()
                attention_mask = torch.cat([torch.ones(gist, dtype=torch.bool), self.keep])[None, None, None]
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)

    tr = pipe.transformer
    g = torch.Generator().manual_seed(1)
    call = {"hidden_states": torch.randn(1, 4, 16, 16, generator=g), "timestep": torch.tensor([0.7]),
            "encoder_hidden_states": torch.randn(1, 6, 20, 48, generator=g),
            "context_latents": [torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 12, 20, generator=g)],
            "return_dict": False}
    with torch.no_grad():
        dense = tr(**call)[0]
        apply_sparse_context_diffusers(tr, SparseContextConfig(keep=0.25, seed=3))
        sparse = tr(**call)[0]
        (index, layout), = sparse_context_state(tr).index.values()
        remove_sparse_context_diffusers(tr)
        assert layout.n == TOKENS + TOKENS + 6 * 10 and layout.grids == [(8, 8), (6, 10)]
        assert index.numel() == TOKENS + 16 + 15
        keep = torch.zeros(layout.n, dtype=torch.bool)
        keep[index] = True
        blocks = [*tr.noise_refiner, *tr.layers]
        for block in blocks:
            block.attention.set_processor(DropKeys(keep))
        try:
            masked = tr(**call)[0]
        finally:
            for block in blocks:
                block.attention.set_processor(BriaFibo2AttnProcessor())
    assert sparse.shape == dense.shape and not torch.allclose(sparse, dense, atol=1e-4)
    torch.testing.assert_close(sparse, masked, atol=2e-5, rtol=1e-4)


def test_several_images_and_a_batch_of_prompts(pipe):
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    seen, handle = patches_seen(pipe)
    out = run(pipe, image=refs(2), prompt=["a cat", "a dog on a hill"])
    handle.remove()
    (index, layout), = sparse_context_state(pipe).index.values()
    assert layout.grids == [(8, 8), (7, 10)]  # the wider image: 40x28 pixels, the size Fibo 2.0 gives its aspect
    assert seen == [(2, TOKENS + round(0.25 * 64) + round(0.25 * 70))] * 4
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()


def test_pixel_scorers_get_the_images_pixels(pipe):
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="edges"))
    run(pipe, image=refs(2))
    state = sparse_context_state(pipe)
    assert state.images is not None and [x.shape for x in state.images] == [(1, 3, 32, 32), (1, 3, 28, 40)]
    want = torch.from_numpy(REF.astype(np.float32) / 255).permute(2, 0, 1)[None]  # 32x32: cropped to itself
    torch.testing.assert_close(state.images[0], want, atol=1e-6, rtol=0)


def test_proportional_and_cache_are_refused(pipe):
    refuses_proportional_and_cache(pipe, "BriaFibo2Transformer2DModel .its forward takes no attention kwargs")


def test_a_lora_added_after_apply_is_thinned_too():
    LoraConfig = pytest.importorskip("peft").LoraConfig  # what diffusers' add_adapter / load_lora_weights use

    p = tiny_bria_fibo2(seed=0)
    p.set_progress_bar_config(disable=True)
    base = p.transformer.x_embedder
    apply_sparse_context_diffusers(p, SparseContextConfig(keep=0.25))
    sparse = run(p)
    torch.manual_seed(1)  # the LoRA's random (not zero) initial weights: it changes the output
    p.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["x_embedder"], init_lora_weights=False))
    wrapper = p.transformer.x_embedder
    assert wrapper is not base and wrapper.base_layer is base
    with_lora = run(p)  # was a RuntimeError: the hook thinned the base Linear's input, not the LoRA term's
    assert len(wrapper._forward_pre_hooks) == 1 and not base._forward_pre_hooks  # moved, not doubled
    remove_sparse_context_diffusers(p)
    assert not wrapper._forward_pre_hooks and not base._forward_pre_hooks
    dense = run(p)
    apply_sparse_context_diffusers(p, SparseContextConfig(keep=0.25))  # the LoRA there first: the same result
    assert np.array_equal(run(p), with_lora)
    assert np.isfinite(with_lora).all() and not np.array_equal(with_lora, sparse)
    assert not np.array_equal(with_lora, dense)
    p.transformer.unload_lora()  # x_embedder is the base Linear again: the hook follows it back
    assert p.transformer.x_embedder is base
    assert np.array_equal(run(p), sparse) and len(base._forward_pre_hooks) == 1 and not wrapper._forward_pre_hooks
