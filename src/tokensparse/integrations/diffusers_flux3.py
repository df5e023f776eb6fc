"""FLUX.3 (``Flux3Transformer2DModel``): its reference images' tokens, thinned.

The transformer takes the reference tokens apart from the target's: ``image_cond_hidden_states (B, N_cond, C)``, every
reference's packed latents one after another, with ``image_cond_ids (N_cond, 4)`` = (T, H, W, L), L = -1 for the
first reference, -2 for the second, ... and H, W the token's row and column times the pipeline's RoPE scale (0.5:
not integers). Its per-mode blocks run the references among themselves, its single blocks over
``[text, target, references]``, and only the target's tokens reach the output, so thinning is a subset of those two
arguments and the output needs nothing put back. Diffusers ships FLUX.3 as a modular pipeline only
(``Flux3ModularPipeline``), so Sparse Context is applied to its transformer (the selection sees latents, no prompt).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .diffusers_layout import InContextAdapter, RefLayout

_REFS = "image_cond_hidden_states"
_IDS = "image_cond_ids"


def grid_cells(coord: Tensor) -> tuple[Tensor, int]:
    """Each token's row (or column) index among the distinct values of ``coord (n,)`` (FLUX.3's scaled H or W ids,
    not integers), and how many there are; token merging reads the target's grid with it too."""
    values, rank = torch.unique(coord, sorted=True, return_inverse=True)
    return rank, int(values.numel())


class Flux3Adapter(InContextAdapter):
    """FLUX.3: the references are ``image_cond_hidden_states``, told apart (and placed) by ``image_cond_ids``."""

    def tokens(self, kwargs: dict[str, Any]) -> Tensor:
        """The reference tokens ``(B, N_cond, C)`` (a call without references: the target's, which it leaves whole)."""
        refs = kwargs.get(_REFS)
        return kwargs["hidden_states"] if refs is None else refs

    def cache_mode(self, kwargs: dict[str, Any]) -> Any:
        """Calls with and without references never share a selection, whatever their shapes."""
        return _REFS if kwargs.get(_REFS) is not None else None

    def layout(self, kwargs: dict[str, Any]) -> RefLayout | None:
        refs, ids = kwargs.get(_REFS), kwargs.get(_IDS)
        if refs is None or ids is None or refs.shape[1] == 0:
            return None
        ids = ids[0] if ids.dim() == 3 else ids  # (N_cond, 4)
        if ids.shape[0] != refs.shape[1]:
            raise ValueError(f"{_REFS} has {refs.shape[1]} tokens but {_IDS} has {ids.shape[0]}")
        layer = ids[:, 3]
        positions, cells, grids = [], [], []
        for value in torch.unique_consecutive(layer).tolist():
            pos = torch.nonzero(layer == value).squeeze(1)
            rows, h = grid_cells(ids[pos, 1])
            cols, w = grid_cells(ids[pos, 2])
            if h * w != len(pos):
                raise ValueError(
                    f"FLUX.3 reference with layer id {value} has {len(pos)} tokens but spans a {h}x{w} grid; "
                    "tokensparse expects dense references (is another token-dropping patch applied?)")
            positions.append(pos)
            cells.append(rows * w + cols)
            grids.append((h, w))
        return RefLayout(ids.shape[0], positions, cells, grids)

    def subset(self, kwargs: dict[str, Any], index: Tensor, layout: RefLayout, state: Any) -> dict[str, Any]:
        out = dict(kwargs)
        out[_REFS] = kwargs[_REFS].index_select(1, index)  # (B, K, C)
        out[_IDS] = kwargs[_IDS].index_select(-2, index.to(kwargs[_IDS].device))
        return out

    def scatter(self, output: Any, index: Tensor, layout: RefLayout) -> Any:
        """Unchanged: the output is the target's tokens alone."""
        return output
