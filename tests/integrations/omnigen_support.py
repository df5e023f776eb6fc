"""OmniGen's processor needs torchvision, which may be missing (or unusable: a CUDA build beside a CPU torch). Its four
transforms are stood in by equivalents here, so that the real pipeline code runs in the tests that build the tiny
OmniGen pipeline (:func:`omnigen_pipe`)."""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch


def transforms() -> types.SimpleNamespace:
    """``torchvision.transforms``' ``Compose``, ``Lambda``, ``ToTensor`` (a uint8 RGB image: ``(3, H, W)`` / 255) and
    ``Normalize``, as OmniGen's processor uses them."""

    def compose(fs):
        def run(x):
            for f in fs:
                x = f(x)
            return x
        return run

    def normalize(mean, std, inplace=False):
        return lambda x: (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    def to_tensor():
        return lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1).contiguous()

    return types.SimpleNamespace(Compose=compose, Lambda=lambda f: f, ToTensor=to_tensor, Normalize=normalize)


def stand_in_transforms(mp: pytest.MonkeyPatch) -> None:
    """Where torchvision does not import, give OmniGen's processor :func:`transforms` (undone with ``mp``)."""
    from diffusers.pipelines.omnigen import pipeline_omnigen, processor_omnigen

    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or a build this torch cannot load
        mp.setattr(processor_omnigen, "transforms", transforms(), raising=False)
        mp.setattr(pipeline_omnigen, "OmniGenMultiModalProcessor", processor_omnigen.OmniGenMultiModalProcessor,
                   raising=False)


def omnigen_pipe() -> Iterator[Any]:
    """The tiny random-weight OmniGen pipeline (seed 0, no progress bar), with :func:`stand_in_transforms` for as long
    as it is used: the body of a module-scoped ``pipe`` fixture."""
    from tokensparse.integrations.diffusers_tiny_omnigen import tiny_omnigen

    with pytest.MonkeyPatch.context() as mp:
        stand_in_transforms(mp)
        p = tiny_omnigen(seed=0)
        p.set_progress_bar_config(disable=True)
        yield p
