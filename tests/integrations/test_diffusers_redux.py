"""Sparse Context on a tiny random-weight FLUX.1 Redux prior (``FluxPriorReduxPipeline``) feeding a tiny FLUX.1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image

import tokensparse as ts
from tokensparse.context import SparseContextConfig
from tokensparse.integrations.diffusers import sparse_context_state
from tokensparse.integrations.diffusers_tiny_redux import (
    REDUX_TOKENS,
    redux_flux_call_kwargs,
    tiny_flux_for_redux,
    tiny_flux_redux,
)

from .contract import NO_KV_CACHE, input_lengths

TEXT = 512  # T5 tokens the prior puts before the image tokens (its max_sequence_length)


@pytest.fixture(scope="module")
def prior():
    return tiny_flux_redux(seed=0)


@pytest.fixture(scope="module")
def flux():
    p = tiny_flux_for_redux(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(autouse=True)
def _unpatched(prior):
    yield
    ts.remove_sparse_context(prior)


def image(seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(32, 32, 3) * 255).astype("uint8"))


def embeds(prior, images=None):
    return prior(image() if images is None else images, prompt="a cat")


def generate(prior, flux) -> np.ndarray:
    out = embeds(prior)
    return flux(prompt_embeds=out.prompt_embeds, pooled_prompt_embeds=out.pooled_prompt_embeds,
                generator=torch.Generator().manual_seed(0), **redux_flux_call_kwargs()).images


def test_identity_sparse_and_remove_end_to_end(prior, flux):
    assert type(prior).__name__ == "FluxPriorReduxPipeline"
    seen = input_lengths(flux.transformer.context_embedder)
    dense = generate(prior, flux)
    assert seen == [TEXT + REDUX_TOKENS] * 2  # 2 steps
    ts.apply_sparse_context(prior, SparseContextConfig(keep=1.0))
    assert np.array_equal(generate(prior, flux), dense)
    seen.clear()
    ts.apply_sparse_context(prior, SparseContextConfig(keep=0.25, selector="auto"))
    sparse = generate(prior, flux)
    assert seen == [TEXT + REDUX_TOKENS // 4] * 2
    assert sparse_context_state(prior).selections == 1
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    ts.apply_sparse_context(prior, SparseContextConfig(keep=0.25, selector="auto"))  # twice = once
    assert np.array_equal(generate(prior, flux), sparse)
    assert len(prior.image_embedder._forward_hooks) == 1
    ts.remove_sparse_context(prior)
    assert not prior.image_embedder._forward_hooks and "encode_image" not in prior.__dict__
    assert np.array_equal(generate(prior, flux), dense)


@pytest.mark.parametrize("keep", [0.5, 0.3, 0.1])
def test_kept_tokens_are_the_dense_ones_in_order(prior, keep):
    dense = embeds(prior).prompt_embeds
    ts.apply_sparse_context(prior, SparseContextConfig(keep=keep, selector="edges"))
    sparse = embeds(prior).prompt_embeds
    index = sparse_context_state(prior).last_index
    assert index.numel() == round(keep * REDUX_TOKENS) and bool((index.diff() > 0).all())
    assert torch.equal(sparse[:, :TEXT], dense[:, :TEXT])  # the prompt's tokens are untouched
    assert torch.equal(sparse[:, TEXT:], dense[:, TEXT + index])


def test_several_images_share_one_selection(prior):
    images = [image(0), image(1)]
    dense = embeds(prior, images).prompt_embeds  # the prior sums the images' tokens: one sequence
    ts.apply_sparse_context(prior, SparseContextConfig(keep=0.25, selector="uniform"))
    sparse = embeds(prior, images).prompt_embeds
    index = sparse_context_state(prior).last_index
    assert sparse.shape == (1, TEXT + REDUX_TOKENS // 4, dense.shape[-1])
    assert torch.allclose(sparse[:, TEXT:], dense[:, TEXT + index])
    assert sparse_context_state(prior).selections == 1


def test_count_and_adaptive_budgets(prior):
    ts.apply_sparse_context(prior, SparseContextConfig(count=10, selector="edges"))
    assert embeds(prior).prompt_embeds.shape[1] == TEXT + 10
    ts.apply_sparse_context(prior, SparseContextConfig(selector="edges", adaptive=True))
    assert TEXT < embeds(prior).prompt_embeds.shape[1] <= TEXT + REDUX_TOKENS


def test_refusals(prior):
    with pytest.raises(ValueError, match=NO_KV_CACHE):
        ts.apply_sparse_context(prior, SparseContextConfig(keep=0.25, cache=True))
    with pytest.raises(ValueError, match="proportional=True is not supported on FluxPriorReduxPipeline"):
        ts.apply_sparse_context(prior, SparseContextConfig(keep=0.25, proportional=True))
    assert not prior.image_embedder._forward_hooks
    ts.apply_sparse_context(prior, SparseContextConfig(keep=0.25))
    with pytest.raises(ValueError, match="square grid of image tokens"):
        prior.image_embedder(torch.zeros(1, 15, 16))


def test_subclass_runs_as_its_base(prior):
    sub = type("MyRedux", (type(prior),), {})(**prior.components)
    dense = sub(image(), prompt="a cat").prompt_embeds
    ts.apply_sparse_context(sub, SparseContextConfig(keep=0.5))
    assert sub(image(), prompt="a cat").prompt_embeds.shape[1] == TEXT + REDUX_TOKENS // 2
    ts.remove_sparse_context(sub)
    assert torch.equal(sub(image(), prompt="a cat").prompt_embeds, dense)


def test_generate_command_refuses_the_prior_naming_the_python_way(capsys):
    import typer
    from diffusers import FluxPriorReduxPipeline

    from tokensparse.cli_checks import check_pipeline

    for name, cls in (("FluxPriorReduxPipeline", None), ("MyRedux", type("MyRedux", (FluxPriorReduxPipeline,), {}))):
        with pytest.raises(typer.Exit):
            check_pipeline(name, 1, cache=False, cls=cls)
        assert f"{name} is FLUX.1 Redux's prior" in capsys.readouterr().err


def test_a_deep_copy_of_a_patched_prior_is_self_contained(prior):
    """``copy.deepcopy`` copies the capture wrappers' partials with their bound methods' owners (the hook, the
    pipeline) through the memo: the copy captures into its own state, selects on its own, and removes on its own."""
    import copy

    ts.apply_sparse_context(prior, SparseContextConfig(keep=0.25, selector="auto"))
    twin = copy.deepcopy(prior)
    hook = twin.__dict__["_tokensparse_redux"]
    assert hook is not prior.__dict__["_tokensparse_redux"]
    for name in ("check_inputs", "encode_image"):
        wrapper = twin.__dict__[name]
        assert wrapper.func.__self__ is hook and wrapper.args[0].__self__ is twin, name
    assert [h.__self__ for h in twin.image_embedder._forward_hooks.values()] == [hook]
    twin(image(), prompt="recolor it")
    assert sparse_context_state(twin).prompts == ["recolor it"] and sparse_context_state(twin).selections == 1
    assert sparse_context_state(prior).prompts is None and sparse_context_state(prior).selections == 0
    assert torch.equal(twin(image(), prompt="a cat").prompt_embeds, embeds(prior).prompt_embeds)
    ts.remove_sparse_context(twin)
    assert not twin.image_embedder._forward_hooks and "encode_image" not in twin.__dict__
    assert len(prior.image_embedder._forward_hooks) == 1 and "encode_image" in prior.__dict__
    part = copy.deepcopy(prior.image_embedder)  # the module alone: its hook's copy, no pipeline dragged along
    assert [type(h.__self__).__name__ for h in part._forward_hooks.values()] == ["ReduxHook"]
    assert not any(isinstance(v, type(prior)) for v in vars(next(iter(part._forward_hooks.values())).__self__).values())
