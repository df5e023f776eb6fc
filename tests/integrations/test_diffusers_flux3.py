"""Sparse Context on a tiny random-weight FLUX.3 transformer, run by diffusers' own modular denoise step.

``Flux3Transformer2DModel`` takes the references apart from the target: ``image_cond_hidden_states`` with
``image_cond_ids`` = (T, H, W, L), reference ``i`` at L = -1 - i; only the target's tokens reach the output.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import tokensparse as ts
from tokensparse.context import SparseContextConfig
from tokensparse.integrations.diffusers import sparse_context_state
from tokensparse.integrations.diffusers_tiny_flux3 import flux3_call_kwargs, tiny_flux3_denoise

from .contract import refuses_proportional_and_cache

GRIDS = [(4, 4), (6, 4)]  # two references: 16 + 24 tokens
TARGET = 4 * 4  # a 64x64 image


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux3_denoise(seed=0)


@pytest.fixture(autouse=True)
def clean(pipe):
    yield
    ts.remove_sparse_context(pipe.transformer)


def record(transformer) -> list[dict]:
    """Each call's target and reference lengths and reference ids, as the transformer's layers get them."""
    seen: list[dict] = []
    transformer.x_embedders["image"].register_forward_pre_hook(
        lambda m, args: seen.append({"target": args[0].shape[1], "refs": None}))
    transformer.x_embedders["image_cond"].register_forward_pre_hook(
        lambda m, args: seen[-1].update(refs=args[0].shape[1]))

    def ids(module, args):
        if bool((args[0][:, 3] < 0).any()):  # the references' (T, H, W, L): L < 0
            seen[-1]["ids"] = args[0]
    transformer.pos_embed.register_forward_pre_hook(ids)
    return seen


def run(pipe, grids=GRIDS, seed=0) -> torch.Tensor:
    return pipe(**flux3_call_kwargs(grids, seed=seed)).values["latents"]


def test_identity_exact_counts_kept_ids_and_remove():
    pipe = tiny_flux3_denoise(seed=0)  # its own: the recording hook stays on it
    seen = record(pipe.transformer)
    dense = run(pipe)
    dense_ids = seen[0]["ids"]
    assert [(s["target"], s["refs"]) for s in seen] == [(TARGET, 40)] * 4  # 2 steps x CFG
    ts.apply_sparse_context(pipe.transformer, SparseContextConfig(keep=1.0))
    assert torch.equal(run(pipe), dense)
    seen.clear()
    ts.apply_sparse_context(pipe.transformer, SparseContextConfig(keep=0.25))
    sparse = run(pipe)
    assert [(s["target"], s["refs"]) for s in seen] == [(TARGET, 16 // 4 + 24 // 4)] * 4
    state = sparse_context_state(pipe.transformer)
    assert state.selections == 1  # one selection serves every step and both guidance passes
    (index, layout), = state.index.values()
    assert layout.grids == GRIDS and layout.n == 40
    assert torch.equal(seen[0]["ids"], dense_ids[index])  # kept tokens keep their (T, H, W, L) ids
    assert [int((seen[0]["ids"][:, 3] == layer).sum()) for layer in (-1, -2)] == [4, 6]
    assert torch.isfinite(sparse).all() and not torch.equal(sparse, dense)
    ts.apply_sparse_context(pipe.transformer, SparseContextConfig(keep=0.25))  # twice = once
    assert torch.equal(run(pipe), sparse)
    ts.remove_sparse_context(pipe.transformer)
    assert torch.equal(run(pipe), dense)


def test_new_references_get_a_new_selection(pipe):
    ts.apply_sparse_context(pipe.transformer, SparseContextConfig(keep=0.25, selector="edges"))
    run(pipe, seed=0)
    first = next(iter(sparse_context_state(pipe.transformer).index.values()))[0]
    run(pipe, seed=5)
    state = sparse_context_state(pipe.transformer)
    assert state.selections == 2 and not torch.equal(next(iter(state.index.values()))[0], first)


def test_a_call_without_references_is_a_no_op(pipe):
    t = pipe.transformer
    g = torch.Generator().manual_seed(0)
    call = {"hidden_states": torch.randn(1, TARGET, 16, generator=g), "encoder_hidden_states": torch.randn(1, 5, 16),
            "timestep": torch.tensor([0.5]), "img_ids": torch.zeros(TARGET, 4), "txt_ids": torch.zeros(5, 4),
            "return_dict": False}
    dense = t(**call)[0]
    ts.apply_sparse_context(t, SparseContextConfig(keep=0.25))
    assert torch.equal(t(**call)[0], dense)


def test_proportional_and_cache_are_refused_and_the_modular_pipeline_points_to_its_transformer(pipe):
    refuses_proportional_and_cache(pipe.transformer, r"not Flux3Transformer2DModel \(its attention_kwargs carry")
    from diffusers.modular_pipelines import Flux3AutoBlocks

    modular = Flux3AutoBlocks().init_pipeline()
    modular.update_components(transformer=pipe.transformer)
    with pytest.raises(TypeError, match=r"Flux3ModularPipeline.*ts\.apply_sparse_context\(pipe\.transformer"):
        ts.apply_sparse_context(modular, SparseContextConfig(keep=0.25))
