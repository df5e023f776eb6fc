"""Subclasses of supported diffusers pipelines and transformers run as their base (:mod:`.classes`): Sparse Context
gives them bit-identical outputs for the same seed, and the refusals that exist on purpose refuse them too, naming
the user's class."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

import tokensparse as ts  # noqa: E402
from tokensparse.context import SparseContextConfig  # noqa: E402
from tokensparse.integrations.classes import known_name  # noqa: E402
from tokensparse.integrations.diffusers import sparse_context_state  # noqa: E402
from tokensparse.integrations.diffusers_tiny import (  # noqa: E402
    flux2_call_kwargs,
    kontext_call_kwargs,
    qwen_call_kwargs,
    tiny_flux2_klein,
    tiny_flux_kontext,
    tiny_qwen_image_edit_plus,
)

from .subclassing import subclass, user_pipeline  # noqa: E402


def _image(seed: int, side: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(side, side, 3) * 255).astype("uint8"))


def _klein_call(guidance: bool = True) -> dict:
    return {"image": [_image(0, 64), _image(1, 64)], "prompt": "put the cat on the sofa", **flux2_call_kwargs(),
            **({"guidance_scale": 2.0} if guidance else {})}  # the KV pipeline has no CFG


def _kontext_call() -> dict:
    return {"image": _image(0, 32), "prompt": "make it red", "negative_prompt": "blur", "true_cfg_scale": 2.0,
            **kontext_call_kwargs()}


def _qwen_call() -> dict:
    return {"image": [_image(0, 32), _image(1, 32)], **qwen_call_kwargs()}


CASES = {  # builder (seed 0), call, config
    "Flux2KleinPipeline": (tiny_flux2_klein, _klein_call, SparseContextConfig(keep=0.5, selector="auto")),
    "Flux2KleinKVPipeline": (lambda: tiny_flux2_klein(kv=True), lambda: _klein_call(guidance=False),
                             SparseContextConfig(keep=0.5, selector="auto", cache=True)),
    "FluxKontextPipeline": (tiny_flux_kontext, _kontext_call, SparseContextConfig(keep=0.5, selector="auto")),
    "QwenImageEditPlusPipeline": (tiny_qwen_image_edit_plus, _qwen_call,
                                  SparseContextConfig(keep=0.5, selector="auto")),
}


def _run(pipe: Any, call: Any) -> np.ndarray:
    return pipe(**call(), generator=torch.Generator().manual_seed(0), output_type="np").images


def test_known_name_is_the_nearest_known_class_of_the_mro() -> None:
    class A:
        pass

    class B(A):
        pass

    class C(B):
        pass

    class Other:
        pass

    class Both(Other, C):
        pass

    assert known_name(C, ("A", "B")) == "B" and known_name(C, {"A": 1}) == "A" and known_name(A, ("B",)) is None
    assert known_name(Both, ("A", "Other")) == "Other"  # MRO order: the nearest base decides
    assert known_name(C, re.compile("^A$")) == "A" and known_name(C, re.compile("Z")) is None
    with pytest.raises(TypeError, match="takes a class"):
        known_name(C(), ("A",))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(CASES))
def test_a_subclassed_pipeline_and_transformer_give_their_base_outputs_bit_for_bit(name: str, monkeypatch) -> None:
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as qwen

    monkeypatch.setattr(qwen, "VAE_IMAGE_SIZE", 32 * 32)  # Qwen resizes references to this many pixels
    build, call, cfg = CASES[name]
    base = build()
    base.set_progress_bar_config(disable=True)
    assert type(base).__name__ == name
    dense = _run(base, call)
    expected = _run(ts.apply_sparse_context(base, cfg), call)
    mine = user_pipeline(build())
    got = _run(ts.apply_sparse_context(mine, cfg), call)
    assert mine.calls == 1 and mine.owner() == "mine" and mine.transformer.owner() == "mine"
    state = sparse_context_state(mine)
    assert state.selections >= 1 and state.images is not None  # its reference pixels were captured, as the base's
    assert np.array_equal(got, expected) and not np.array_equal(got, dense)
    ts.remove_sparse_context(mine)
    assert np.array_equal(_run(mine, call), dense)
    if name == "Flux2KleinPipeline":  # the bare subclassed transformer too
        ts.apply_sparse_context(mine.transformer, cfg)
        assert sparse_context_state(mine.transformer) is not None


def test_refusals_hold_for_subclasses_and_name_the_users_class() -> None:
    from diffusers import Flux2KleinKVPipeline, QwenImageTransformer2DModel

    layered = subclass(QwenImageTransformer2DModel)(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6), use_layer3d_rope=True, use_additional_t_cond=True)
    for model in (layered, layered.__class__.from_config({**layered.config, "use_layer3d_rope": False})):
        with pytest.raises(ValueError, match="not MyQwenImageTransformer2DModel .its QwenDoubleStreamAttnProcessor2_0"):
            ts.apply_sparse_context(model, SparseContextConfig(keep=0.5, proportional=True))
    ts.apply_sparse_context(layered, SparseContextConfig(keep=0.25))  # supported as its base: the layered adapter
    assert type(layered.__dict__["_tokensparse_sparse_context"].adapter).__name__ == "QwenImageLayeredAdapter"
    ts.remove_sparse_context(layered)

    klein = tiny_flux2_klein()
    mine = user_pipeline(klein)
    with pytest.raises(ValueError, match="cache=True needs a pipeline with a reference K/V cache"):
        ts.apply_sparse_context(mine, SparseContextConfig(keep=0.5, cache=True))
    kv = subclass(Flux2KleinKVPipeline).from_pipe(klein)
    with pytest.raises(ValueError, match="proportional=True cannot be combined with FLUX.2's reference K/V cache"):
        ts.apply_sparse_context(kv, SparseContextConfig(keep=0.5, proportional=True))
    mine.transformer = torch.compile(mine.transformer)  # an OptimizedModule wrapper: hooks belong on the model
    with pytest.raises(TypeError, match=r"MyFlux2KleinPipeline has no supported transformer \(OptimizedModule\); "
                                        "compile in place"):
        ts.apply_sparse_context(mine, SparseContextConfig(keep=0.5))
    mine.transformer = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"MyFlux2KleinPipeline has no supported transformer \(Linear\)$"):
        ts.apply_sparse_context(mine, SparseContextConfig(keep=0.5))


def test_lora_training_trains_a_subclassed_klein_as_its_base(tmp_path) -> None:
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    from tokensparse.integrations.diffusers_lora import WEIGHTS, Example, LoraTrainConfig, train_lora_sparse

    examples = [Example([_image(2 * i, 32)], _image(2 * i + 1, 32), f"edit {i}") for i in range(2)]
    cfg = LoraTrainConfig(steps=2, resolution=32, rank=2, max_sequence_length=16, seed=5, lr=1e-2)
    expected = train_lora_sparse(tiny_flux2_klein(seed=0), examples, cfg, tmp_path / "base")
    mine = user_pipeline(tiny_flux2_klein(seed=0))
    assert train_lora_sparse(mine, examples, cfg, tmp_path / "mine") == expected
    base_weights, weights = load_file(tmp_path / "base" / WEIGHTS), load_file(tmp_path / "mine" / WEIGHTS)
    assert base_weights.keys() == weights.keys() and all(torch.equal(weights[k], base_weights[k]) for k in weights)
    other = subclass(type(tiny_qwen_image_edit_plus()))
    with pytest.raises(TypeError, match=r"supports \('Flux2KleinPipeline',\) \(or subclasses\), got MyQwenImageEdit"):
        train_lora_sparse(other.from_pipe(tiny_qwen_image_edit_plus()), examples, cfg, tmp_path / "other")


def test_generate_commands_checks_take_a_subclass_as_its_base(capsys) -> None:
    import typer
    from diffusers import FluxKontextInpaintPipeline, OmniGenPipeline, QwenImageEditPipeline

    from tokensparse.cli_checks import check_pipeline, check_placeholders

    for cls, n_refs, why in ((FluxKontextInpaintPipeline, 1, "is not supported here (inpainting pipelines"),
                             (QwenImageEditPipeline, 2, "takes one reference image")):
        mine = subclass(cls)
        with pytest.raises(typer.Exit):
            check_pipeline(mine.__name__, n_refs, cache=False, cls=mine)
        assert f"My{cls.__name__} {why}" in capsys.readouterr().err
    check_pipeline("MyQwenImageEditPipeline", 1, cache=False, cls=subclass(QwenImageEditPipeline))  # runs
    with pytest.raises(typer.Exit):
        check_placeholders("MyOmniGenPipeline", "a cat", 1, cls=subclass(OmniGenPipeline))
    assert "MyOmniGenPipeline places each reference" in capsys.readouterr().err
