"""Sparse Context on a tiny random-weight Bria FIBO Edit pipeline (tiny SmolLM3 text encoder, built offline).

``BriaFiboEditPipeline`` feeds ``BriaFiboTransformer2DModel`` ``[noisy target, reference 1, ...]`` with FLUX-style
``img_ids`` (T = 0 for the target, ``i`` for reference ``i``); when the prompt and the (empty) negative prompt
differ in length it also passes a boolean key mask over ``[text, image]`` in ``joint_attention_kwargs``.
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
    sparse_context_state,
)
from tokensparse.integrations.diffusers_tiny_bria import tiny_bria_fibo_edit

from .contract import pipe_fixtures, reapply_then_remove, refuses_proportional_and_cache

TOKENS = 8 * 8  # 128x128 images: 16 pixels per token
REF = (np.random.RandomState(0).rand(128, 128, 3) * 255).astype("uint8")
PROMPT = '{"edit_instruction": "a cat"}'


pipe, clean = pipe_fixtures(tiny_bria_fibo_edit)


class Seen:
    """Image tokens and attention-mask keys of every transformer call (a forward pre-hook)."""

    def __init__(self, tr) -> None:
        self.tokens: list[int] = []
        self.keys: list[int | None] = []
        self.masks: list = []
        self.handle = tr.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs) -> None:
        self.tokens.append(kwargs["hidden_states"].shape[1])
        mask = (kwargs.get("joint_attention_kwargs") or {}).get("attention_mask")
        self.keys.append(None if mask is None else mask.shape[-1])
        self.masks.append(mask)


def run(pipe, refs: int = 1):
    image = Image.fromarray(REF) if refs == 1 else [Image.fromarray(np.roll(REF, 7 * i, 0)) for i in range(refs)]
    return pipe(prompt=PROMPT, image=image, height=128, width=128, num_inference_steps=2, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(0), output_type="np", max_sequence_length=64).images


def test_identity_sparse_thinned_mask_remove_and_reapply(pipe):
    full = Seen(pipe.transformer)
    dense = run(pipe)
    full.handle.remove()
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=1.0))
    assert np.array_equal(run(pipe), dense)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    seen = Seen(pipe.transformer)  # registered after Sparse Context's hook: sees the thinned call
    sparse = run(pipe)
    seen.handle.remove()
    assert seen.tokens == [TOKENS + TOKENS // 4] * 2  # 2 steps, CFG batched: target whole + a quarter
    n_txt = seen.keys[0] - seen.tokens[0]  # the padded prompt makes the pipeline pass a key mask
    assert n_txt > 0 and seen.keys == [n_txt + TOKENS + TOKENS // 4] * 2
    state = sparse_context_state(pipe)
    assert state.selections == 1
    (index, layout), = state.index.values()
    assert layout.grids == [(8, 8)] and (index[:TOKENS] == torch.arange(TOKENS)).all()
    keys = torch.cat([torch.arange(n_txt), n_txt + index])  # the text keys, then the kept image tokens' keys
    assert not full.masks[0][..., :n_txt].all()  # the text is padded: the mask's text part is not all True
    assert torch.equal(seen.masks[0], full.masks[0].index_select(-1, keys))
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    reapply_then_remove(pipe, run, sparse, dense, [pipe.transformer])


def test_two_references_each_keep_a_quarter(pipe):
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    seen = Seen(pipe.transformer)
    out = run(pipe, refs=2)
    seen.handle.remove()
    assert seen.tokens == [TOKENS + 2 * (TOKENS // 4)] * 2
    (_, layout), = sparse_context_state(pipe).index.values()
    assert layout.grids == [(8, 8), (8, 8)] and np.isfinite(out).all()


def test_proportional_and_cache_are_refused(pipe):
    refuses_proportional_and_cache(pipe, "BriaFiboTransformer2DModel .its pipeline passes its own text-padding")


def test_a_mask_that_is_not_a_key_mask_tensor_is_a_value_error_naming_it():
    from tokensparse.integrations.diffusers_models import BriaFiboAdapter, RefLayout

    adapter = BriaFiboAdapter()
    grid = torch.tensor([[r, c] for r in range(2) for c in range(2)], dtype=torch.float32)
    ids = torch.cat([torch.cat([torch.full((4, 1), t), grid], 1) for t in (0.0, 1.0)])  # 2x2 target, 2x2 reference
    kwargs = {"hidden_states": torch.zeros(1, 8, 4), "img_ids": ids,
              "joint_attention_kwargs": {"attention_mask": [[True] * 10]}}
    layout = adapter.layout(kwargs)
    assert isinstance(layout, RefLayout) and layout.n == 8
    with pytest.raises(ValueError, match="must be a key mask"):  # was an AttributeError on .shape
        adapter.subset(kwargs, torch.tensor([0, 1, 2, 3, 5]), layout, None)


def test_pixel_scorers_get_every_reference_s_pixels(pipe):
    # the pipeline encodes one PIL reference per prepare_reference_latents call: each call's pixels are kept
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="edges"))
    run(pipe, refs=2)
    state = sparse_context_state(pipe)
    assert state.images is not None and len(state.images) == 2  # was None: edges scored VAE latents
    for i, image in enumerate(state.images):
        want = torch.from_numpy(np.roll(REF, 7 * i, 0).astype(np.float32) / 255).permute(2, 0, 1)[None]
        assert image.shape == want.shape and torch.allclose(image, want)
