"""Token merging treats subclasses of diffusers pipelines and models as their base (:mod:`.classes`): the same code
path and outputs, bit for bit, and the refusals of their base."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tokensparse as ts  # noqa: E402
from tokensparse.integrations.diffusers_tiny_sd import sd_call_kwargs, tiny_stable_diffusion  # noqa: E402
from tokensparse.integrations.diffusers_tiny_variants import tiny_variant  # noqa: E402
from tokensparse.integrations.diffusers_tiny_visualcloze import tiny_visualcloze  # noqa: E402
from tokensparse.integrations.merging_hooks import merging_supports  # noqa: E402
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from .subclassing import subclass, user_pipeline  # noqa: E402
from .test_merging_variants import _visualcloze_call  # noqa: E402

MERGE = TokenMergingConfig(ratio=0.5)


def _merged(pipe: Any, call: Any) -> tuple[np.ndarray, np.ndarray]:
    """(dense, merged) outputs of ``pipe``."""
    dense = pipe(**call()).images
    ts.apply_token_merging(pipe, MERGE)
    return dense, pipe(**call()).images


def _sd_call() -> dict:
    return {"prompt": "a cat", **sd_call_kwargs()}


@pytest.mark.parametrize("build, call", [(tiny_stable_diffusion, _sd_call), (tiny_visualcloze, _visualcloze_call)],
                         ids=["unet", "visualcloze"])
def test_a_subclassed_pipeline_and_model_merge_like_their_base_bit_for_bit(build: Any, call: Any) -> None:
    # VisualCloze: its FLUX.1 transformer's calls number no token 0 (the query row, last, holds the target); a
    # subclassed transformer had merged the first in-context example row instead
    base = build(seed=0)
    base.set_progress_bar_config(disable=True)
    dense, expected = _merged(base, call)
    mine = user_pipeline(build(seed=0))
    mine_dense, got = _merged(mine, call)
    assert np.array_equal(mine_dense, dense) and np.array_equal(got, expected) and not np.array_equal(got, dense)
    assert mine.calls == 2
    if build is tiny_visualcloze:  # stacked with Sparse Context (VisualCloze's own adapter, by the pipeline's base)
        for pipe in (base, mine):
            ts.apply_sparse_context(pipe, ts.SparseContextConfig(keep=0.25))
        assert np.array_equal(mine(**call()).images, base(**call()).images)


def test_pipelines_reading_attention_maps_refuse_their_subclasses_too() -> None:
    sag = tiny_variant("StableDiffusionSAGPipeline")
    mine = subclass(type(sag)).from_pipe(sag)
    with pytest.raises(ValueError, match=r"cfg.max_downsample=2 .* MyStableDiffusionSAGPipeline reads"):
        ts.apply_token_merging(mine, TokenMergingConfig(ratio=0.5, max_downsample=2))
    excite = tiny_variant("StableDiffusionAttendAndExcitePipeline")
    mine = subclass(type(excite)).from_pipe(excite)
    with pytest.raises(ValueError, match="merge_cross=True does not work with MyStableDiffusionAttendAndExcite"):
        ts.apply_token_merging(mine, TokenMergingConfig(ratio=0.5, merge_cross=True))


class TinyVideoDiT(nn.Module):
    """A video model built of image blocks (its name says so): token merging refuses it."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        self.blocks = nn.ModuleList([BasicTransformerBlock(16, 2, 8)])

    def forward(self, hidden_states: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return self.blocks[0](hidden_states)


class SpatioTemporalMixer(nn.Module):
    """A part only video models hold (by its name)."""


def test_subclasses_of_video_models_and_of_their_parts_are_refused() -> None:
    assert "video" in merging_supports(TinyVideoDiT())
    mine = type("MyDiT", (TinyVideoDiT,), {})()  # a name that does not say video: its base does
    assert "video models (MyDiT, built with TinyVideoDiT)" in merging_supports(mine)
    image = type("ImageDiT", (nn.Module,), {"forward": TinyVideoDiT.forward})()  # the same blocks, an image model
    image.blocks = TinyVideoDiT().blocks
    assert merging_supports(image) is None
    image.mixer = type("Mixer", (SpatioTemporalMixer,), {})()
    assert "video models (ImageDiT, built with Mixer)" in merging_supports(image)
