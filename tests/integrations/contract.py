"""The apply / re-apply / remove contract of Sparse Context on a diffusers pipeline, shared by the per-pipeline
tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import nn

from tokensparse.context import SparseContextConfig
from tokensparse.integrations.diffusers import apply_sparse_context_diffusers, remove_sparse_context_diffusers


def reapply_then_remove(pipe: Any, run: Callable[[Any], np.ndarray], sparse: np.ndarray, dense: np.ndarray,
                        hooked: Sequence[nn.Module]) -> None:
    """``pipe`` runs Sparse Context at keep 0.25 (output ``sparse``; ``dense`` without it): applying it again gives
    the same output with one pre-hook on each of the ``hooked`` modules (not stacked); removing it leaves none and
    the exact dense output."""
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))  # twice = once
    assert np.array_equal(run(pipe), sparse)
    assert all(len(module._forward_pre_hooks) == 1 for module in hooked)
    remove_sparse_context_diffusers(pipe)
    assert not any(module._forward_pre_hooks for module in hooked)
    assert np.array_equal(run(pipe), dense)
