"""FLOP counting that also sees CPU fused attention.

``torch.utils.flop_counter.FlopCounterMode`` has formulas for the CUDA SDPA kernels but not for the CPU ones
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward), so on a CPU it silently counts
attention as 0. :func:`flop_counter` adds their formulas to that one counter only (no global registration):
forward ``4 * B * H * Lq * Lk * Dh`` (the two matmuls ``Q K^T`` and ``P V``), backward twice that (``dV``,
``dP``, ``dQ``, ``dK``), as torch counts the CUDA kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

_aten = torch.ops.aten


def _matmuls(query_shape: Any, key_shape: Any, value_shape: Any) -> int:
    """FLOPs of ``Q K^T`` plus ``P V`` for ``(B, H, L, D)`` shapes."""
    b, h, lq, dh = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * lk * dh + 2 * b * h * lq * lk * dv


def _sdpa_cpu_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                   **kwargs: Any) -> int:
    return _matmuls(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                            out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * _matmuls(query_shape, key_shape, value_shape)


CPU_SDPA_FORMULAS: dict[Any, Callable[..., int]] = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flop,
}


def flop_counter() -> FlopCounterMode:
    """A quiet ``FlopCounterMode`` that counts CPU SDPA (forward and backward) too; use as a context manager."""
    return FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FORMULAS)


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of running ``fn()`` once (multiply-add = 2 FLOPs), backward passes it runs included."""
    with flop_counter() as counter:
        fn()
    return int(counter.get_total_flops())
