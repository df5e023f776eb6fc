"""Model calls told apart, and replayed under gradient checkpointing (no merging or model knowledge here).

:func:`call_key` fingerprints a call's arguments (identical calls repeat their matchings, a block recomputed in
backward finds its forward's record); :func:`_in_backward` tells a recomputation in backward, and :class:`Recorded`
keeps what forwards computed for it.
Token merging (:mod:`.merging_core`, :mod:`.merging_blocks`) and Sparse Context's block hooks
(:mod:`.diffusers_layout`) use them.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor


def call_key(call: dict) -> Hashable:
    """A fingerprint of a model call's arguments: equal for identical calls, different (in practice) otherwise.

    Tensors count by shape, dtype, 16 evenly spaced values and, past 16 values, their sum (integer and bool tensors
    also by a position-weighted sum, so a permutation of token ids differs; a tensor of at most 16 values is
    sampled whole, which tells any change). Numbers, strings and ``None`` by value;
    lists, tuples and dicts by their contents (three levels deep); other objects by identity (RefDiT's reference
    ``TokenSeq`` and cached ``ContextKV``: ``generate`` passes one object per distinct context, so CFG's two
    branches under the null prompt are one call with the cache as without it). float32 on the tensors' device (MPS
    has no float64), one host copy per device. Every model call of a merged model takes one, so it is kept to a
    few ops per tensor: one strided slice for the sample, the sums stacked once per device, the ramps kept.
    """
    meta: list[Hashable] = []
    samples: dict[torch.device, list[Tensor]] = {}
    sums: dict[torch.device, list[Tensor]] = {}

    def visit(path: tuple, v: Any, depth: int) -> None:
        if isinstance(v, Tensor):
            meta.append((path, tuple(v.shape), str(v.dtype)))
            n = v.numel()
            if n and not v.is_complex():
                flat = v.detach().reshape(-1)
                step = max(1, n // 16)
                samples.setdefault(flat.device, []).append(flat[: 16 * step: step].float())
                if n > 16:
                    out = sums.setdefault(flat.device, [])
                    out.append(flat.sum(dtype=torch.float32))
                    if not flat.is_floating_point():  # ids and masks: order matters (a permutation must differ)
                        out.append((flat * _ramp(n, flat.device)).sum())
        elif v is None or isinstance(v, (bool, int, float, str)):
            meta.append((path, v))
        elif isinstance(v, (list, tuple, dict)) and depth < 3:
            items = sorted(v.items(), key=lambda kv: str(kv[0])) if isinstance(v, dict) else enumerate(v)
            meta.append((path, type(v).__name__, len(v)))
            for k, item in items:
                visit((*path, k), item, depth + 1)
        else:
            meta.append((path, id(v)))

    for name in sorted(call):
        visit((name,), call[name], 0)
    values: list[float] = []
    for dev in sorted(samples, key=str):
        probes = samples[dev] + ([torch.stack(sums[dev])] if dev in sums else [])
        values.extend(torch.cat(probes).cpu().tolist())
    return tuple(meta), tuple(values)


@functools.lru_cache(maxsize=16)
def _ramp(n: int, device: torch.device) -> Tensor:
    """``linspace(1, 2, n)`` on ``device``, the weights of :func:`call_key`'s position-weighted sums (made once per
    length: every call of a model passes ids of the same length). Made outside inference mode."""
    with torch.inference_mode(False):
        return torch.linspace(1.0, 2.0, n, device=device)


def _in_backward() -> bool:
    """Whether autograd is running a backward pass now (a checkpointed block being recomputed)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


MAX_RECORDED = 4096
"""Inputs whose values :class:`Recorded` keeps for their recomputation in backward (under gradient
checkpointing), oldest dropped first; a recomputation uses its entry up. Enough for hundreds of forwards of a
deep model before one backward."""


class Recorded:
    """What forwards computed, by key (a module and a fingerprint of its input), for gradient checkpointing: a
    block recomputed in backward must get what its forward got. :meth:`pop` hands back the newest value pushed
    for a key (backward visits the forwards newest first) and uses it up; at most :data:`MAX_RECORDED` keys,
    oldest dropped first. Token merging records matchings, Sparse Context's block hooks their call's thinning."""

    def __init__(self) -> None:
        self._stacks: OrderedDict[Hashable, list[Any]] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._stacks)

    def push(self, key: Hashable, value: Any) -> None:
        self._stacks.setdefault(key, []).append(value)
        self._stacks.move_to_end(key)
        while len(self._stacks) > MAX_RECORDED:
            self._stacks.popitem(last=False)

    def pop(self, key: Hashable) -> Any | None:
        """The newest value pushed for ``key``, removed; ``None`` if there is none."""
        stack = self._stacks.get(key)
        if not stack:
            return None
        value = stack.pop()
        if not stack:
            del self._stacks[key]
        return value
