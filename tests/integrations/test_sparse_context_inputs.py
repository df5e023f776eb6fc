"""Sparse Context on every supported pipeline with inputs the per-family tests do not use: references of other
sizes and aspects than each other and the output, explicit output sizes, several images per prompt, a list of
generators, a step-end callback, tensor and latent outputs; a pipeline made with ``from_pipe`` after applying;
``pipe.to(dtype)`` after applying. For each: ``keep=1.0`` is the dense output exactly, sparse calls repeat exactly,
and removing restores the dense output exactly. Tiny random-weight pipelines, 2 steps."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image

from tokensparse.context import SparseContextConfig
from tokensparse.integrations import diffusers_tiny as tiny
from tokensparse.integrations.diffusers import (
    apply_sparse_context_diffusers,
    remove_sparse_context_diffusers,
    sparse_context_state,
)

from .omnigen_support import stand_in_transforms


def img(seed: int, h: int = 32, w: int = 32) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def step_end(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
    return {"latents": kwargs["latents"] * 0.9}  # changes the run: the callback's latents go on


def build(name: str) -> tuple[Any, Callable[..., Any]]:
    """The tiny pipeline ``name`` and ``call(pipe, **overrides)`` running it (2 steps, guidance on)."""
    if name in ("flux2", "flux2_kv"):
        pipe = tiny.tiny_flux2_klein(seed=0, kv=name == "flux2_kv")
        extra = {"guidance_scale": 2.0} if name == "flux2" else {}
        base = dict(image=[img(0, 64, 64), img(1, 64, 96)], prompt="a cat", **extra, **tiny.flux2_call_kwargs())
    elif name == "kontext":
        pipe = tiny.tiny_flux_kontext(seed=0)
        base = dict(image=img(0, 32, 48), prompt="a cat", negative_prompt="blur", true_cfg_scale=2.0,
                    **tiny.kontext_call_kwargs())
    elif name == "qwen_plus":
        pipe = tiny.tiny_qwen_image_edit_plus(seed=0, zero_cond_t=True)
        base = dict(image=[img(0, 32, 48), img(1, 64, 32)], **tiny.qwen_call_kwargs())
    elif name == "longcat":
        pipe = tiny.tiny_longcat_image_edit(seed=0)
        base = dict(image=img(0, 32, 48), prompt="a cat", num_inference_steps=2, guidance_scale=2.0)
    elif name == "bria":
        from tokensparse.integrations.diffusers_tiny_bria import tiny_bria_fibo_edit

        pipe = tiny_bria_fibo_edit(seed=0)
        base = dict(prompt='{"edit_instruction": "a cat"}', image=[img(0, 128, 128), img(1, 128, 192)], height=128,
                    width=128, num_inference_steps=2, guidance_scale=2.0, max_sequence_length=64)
    elif name == "fibo2":
        from tokensparse.integrations.diffusers_tiny_fibo2 import tiny_bria_fibo2

        pipe = tiny_bria_fibo2(seed=0)
        base = dict(prompt="a cat", image=[img(0), img(1, 32, 48)], height=32, width=32, num_inference_steps=2,
                    guidance_scale=2.0)
    elif name == "zimage":
        from tokensparse.integrations.diffusers_tiny_zimage import tiny_z_image_omni

        pipe = tiny_z_image_omni(seed=0)
        base = dict(image=[img(0, 68, 64), img(1, 64, 96)], prompt="a cat", height=64, width=64,
                    num_inference_steps=2, guidance_scale=2.0, max_sequence_length=32)
    elif name == "joy":
        from tokensparse.integrations.diffusers_tiny_joyimage import tiny_joyimage_edit

        pipe = tiny_joyimage_edit(seed=0)
        base = dict(image=img(0, 32, 48), prompt="a cat", num_inference_steps=2, guidance_scale=2.0)
    elif name == "qwen21":
        from tokensparse.integrations.diffusers_tiny_qwen21 import tiny_qwen_image21

        pipe = tiny_qwen_image21(seed=0)
        base = dict(prompt="a cat", image=[img(0, 128, 128), img(1, 96, 192)], output_resolution=128,
                    num_inference_steps=2)
    elif name == "omnigen":
        from tokensparse.integrations.diffusers_tiny_omnigen import tiny_omnigen

        pipe = tiny_omnigen(seed=0)
        base = dict(prompt=["<img><|image_1|></img> a red cat with <img><|image_2|></img>"],
                    input_images=[[img(0, 256, 192), img(1, 128, 256)]], height=64, width=64, num_inference_steps=2)
    else:
        raise AssertionError(name)
    pipe.set_progress_bar_config(disable=True)

    def call(pipe: Any, **over: Any) -> Any:
        torch.manual_seed(0)  # JoyImage and OmniGen sample their references' latents from the global generator
        kwargs = {**base, "generator": gen(), "output_type": "np", **over}
        if "prompt_embeds" in kwargs:  # Qwen-Image-Edit: embeddings in the transformer's dtype
            dtype = pipe.transformer.dtype
            kwargs = {k: v.to(dtype) if k.endswith("_embeds") else v for k, v in kwargs.items()}
        out = pipe(**kwargs).images
        return torch.from_numpy(out) if isinstance(out, np.ndarray) else out

    return pipe, call


PIPELINES = ["flux2", "flux2_kv", "kontext", "qwen_plus", "longcat", "bria", "fibo2", "zimage", "joy", "qwen21",
             "omnigen"]
# per pipeline, what its references and output size may be (besides its default)
OTHER_INPUTS: dict[str, dict[str, Any]] = {
    "flux2": {"image": [img(0, 128, 64), img(1, 64, 64), img(2, 96, 64)], "height": 48, "width": 32},
    "flux2_kv": {"image": [img(0, 128, 64)], "height": 48, "width": 32},
    "kontext": {"image": img(0, 64, 32), "height": 48, "width": 32, "max_area": 48 * 32},
    "qwen_plus": {"image": [img(0, 96, 32), img(1), img(2, 48, 64)], "height": 48, "width": 32},
    "longcat": {"image": img(0, 64, 32)},
    "bria": {"image": img(0, 192, 128), "height": 128, "width": 192},
    "fibo2": {"image": [img(0, 64, 32), img(1)], "height": 48, "width": 32},
    "zimage": {"image": [img(0, 96, 64)], "height": 64, "width": 96},
    "joy": {"image": img(0, 48, 32), "height": 32, "width": 48},
    "qwen21": {"image": [img(0, 192, 96)], "height": 128, "width": 192},
    "omnigen": {"input_images": [[img(0, 128, 256), img(1, 256, 192)]], "height": 64, "width": 96},
}
VARIANTS: dict[str, Callable[[str], dict[str, Any]]] = {
    "other_sizes": lambda name: dict(OTHER_INPUTS[name]),
    "two_per_prompt": lambda name: {"num_images_per_prompt": 2},
    "generator_list": lambda name: {"num_images_per_prompt": 2, "generator": [gen(0), gen(1)]},
    "step_end_callback": lambda name: {"callback_on_step_end": step_end},
    "tensor_output": lambda name: {"output_type": "pt"},
    "latent_output": lambda name: {"output_type": "latent"},
}
PROPORTIONAL = {"flux2", "kontext", "omnigen"}


@pytest.fixture(scope="module", autouse=True)
def small_models():
    """The module constants that size these pipelines' images for 1024^2 outputs, shrunk; OmniGen's processor without
    torchvision."""
    import diffusers.pipelines.joyimage.image_processor as joy
    import diffusers.pipelines.longcat_image.pipeline_longcat_image_edit as longcat
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as qwen_plus

    from tokensparse.integrations.diffusers_tiny_joyimage import SMALL_BUCKETS

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qwen_plus, "VAE_IMAGE_SIZE", 48 * 48)  # references of another aspect get other grids
        original = longcat.calculate_dimensions
        mp.setattr(longcat, "calculate_dimensions", lambda area, ratio: original(32 * 32, ratio))
        mp.setitem(joy.BUCKETS, 1024, SMALL_BUCKETS)
        stand_in_transforms(mp)
        yield


@pytest.fixture(scope="module")
def pipes(small_models) -> dict[str, tuple[Any, Callable[..., Any]]]:
    return {}


@pytest.fixture
def built(request, pipes):
    name = request.param
    if name not in pipes:
        pipes[name] = build(name)
    pipe, call = pipes[name]
    yield pipe, call
    remove_sparse_context_diffusers(pipe)


def run_sparse(pipe: Any, call: Callable[..., Any], cfg: SparseContextConfig,
               over: Callable[[], dict[str, Any]] = dict) -> Any:
    """Two calls with ``cfg`` applied and the arguments ``over()`` (fresh generators each time): the same output
    (returned)."""
    apply_sparse_context_diffusers(pipe, cfg)
    out = call(pipe, **over())
    assert torch.equal(call(pipe, **over()), out), f"{cfg}: a second call differs"
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("built", PIPELINES, indirect=True)
def test_keep_one_is_dense_and_remove_restores_it(built, variant, request):
    pipe, call = built
    name = request.node.callspec.params["built"]

    def over() -> dict[str, Any]:
        return VARIANTS[variant](name)

    if not set(over()) <= set(inspect.signature(pipe.__call__).parameters):
        pytest.skip(f"{type(pipe).__name__} takes no {sorted(over())}")
    dense = call(pipe, **over())
    assert torch.equal(run_sparse(pipe, call, SparseContextConfig(keep=1.0), over), dense)
    configs = [SparseContextConfig(keep=0.5, selector="edges")]
    if variant == "other_sizes":  # budgets over references of different sizes
        configs += [SparseContextConfig(count=3, selector="random"),
                    SparseContextConfig(adaptive=True, selector="auto")]
    if name in PROPORTIONAL:
        configs.append(SparseContextConfig(keep=0.5, selector="uniform", proportional=True))
    if name == "flux2_kv":
        configs.append(SparseContextConfig(keep=0.5, selector="edges", cache=True))
    for cfg in configs:
        sparse = run_sparse(pipe, call, cfg, over)
        assert sparse.shape == dense.shape and torch.isfinite(sparse.float()).all(), cfg
        assert not torch.equal(sparse, dense), f"{cfg}: no token was dropped"
    remove_sparse_context_diffusers(pipe)
    assert torch.equal(call(pipe, **over()), dense)


# Z-Image Omni's from_pipe casts its tiny pipeline's bfloat16 VAE to float32, which the pipeline cannot run
@pytest.mark.parametrize("built", [n for n in PIPELINES if n != "zimage"], indirect=True)
def test_from_pipe_after_apply_shares_the_transformers_selection(built):
    pipe, call = built
    dense = call(pipe)
    sparse = run_sparse(pipe, call, SparseContextConfig(keep=0.5, selector="uniform"))
    other = type(pipe).from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    if hasattr(pipe, "default_sample_size"):  # Fibo 2.0's tiny builder shrinks it on the instance
        other.default_sample_size = pipe.default_sample_size
    assert torch.equal(call(other), sparse)  # the hook lives on the shared transformer (a warning says so)
    assert torch.equal(run_sparse(other, call, SparseContextConfig(keep=0.5, selector="uniform")), sparse)
    assert torch.equal(call(pipe), sparse)
    remove_sparse_context_diffusers(other)  # from the transformer both share
    assert torch.equal(call(pipe), dense) and torch.equal(call(other), dense)
    assert sparse_context_state(pipe) is None


# pipelines whose tiny dense pipeline cannot run in that dtype (OmniGen's float64 output is NaN; Z-Image Omni's
# float64 VAE gets bfloat16 pixels)
DTYPE_BROKEN = {("omnigen", torch.float64), ("zimage", torch.float64)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("built", PIPELINES, indirect=True)
def test_pipe_to_dtype_after_apply(built, dtype, request):
    pipe, call = built
    if (request.node.callspec.params["built"], dtype) in DTYPE_BROKEN:
        pytest.skip("the dense pipeline does not run in this dtype")
    dense_pipe, patched = copy.deepcopy(pipe), copy.deepcopy(pipe)
    dense = call(dense_pipe.to(dtype))
    apply_sparse_context_diffusers(patched, SparseContextConfig(keep=0.5, selector="edges"))
    sparse = call(patched.to(dtype))
    assert sparse.shape == dense.shape and torch.isfinite(sparse.float()).all()
    assert not torch.equal(sparse, dense)
    apply_sparse_context_diffusers(patched, SparseContextConfig(keep=1.0))
    assert torch.equal(call(patched), dense)
    remove_sparse_context_diffusers(patched)
    assert torch.equal(call(patched), dense)
