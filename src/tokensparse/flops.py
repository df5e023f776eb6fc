"""FLOP counting that also sees CPU fused attention.

``torch.utils.flop_counter.FlopCounterMode`` has formulas for the CUDA SDPA kernels but not for
``aten._scaled_dot_product_flash_attention_for_cpu``, so on a CPU it silently counts attention as 0.
:func:`count_flops` registers that formula (forward: ``4 * B * H * Lq * Lk * Dh``, the two matmuls).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

_aten = torch.ops.aten
_registered = False


def _sdpa_cpu_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                   **kwargs: Any) -> int:
    b, h, lq, dh = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * lk * dh + 2 * b * h * lq * lk * dv


def _register() -> None:
    global _registered
    if not _registered:
        register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)(_sdpa_cpu_flop)
        _registered = True


def flop_counter() -> FlopCounterMode:
    """A quiet ``FlopCounterMode`` that counts CPU SDPA too; use as a context manager."""
    _register()
    return FlopCounterMode(display=False)


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of running ``fn()`` once (multiply-add = 2 FLOPs)."""
    with flop_counter() as counter:
        fn()
    return int(counter.get_total_flops())
