"""A training run's processes: the accelerate ``Accelerator`` each :func:`tokensparse.train.train` call gets, each
process's own random draws per step (:func:`step_generator`), and the values its processes agree on (each of
those helpers is one collective that every process calls at the same step)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from .extras import require

if TYPE_CHECKING:
    from accelerate import Accelerator


def cpu_only() -> bool:
    """Whether no accelerator (CUDA, MPS, XPU, ...) is visible: accelerate is then told ``cpu=True``, so that
    ``torchrun`` / ``accelerate launch`` processes form one CPU world instead of separate single-process runs
    (``train-lora``; RefDiT's :func:`accelerator` uses a GPU or the CPU)."""
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return not probe.is_available()
    return not torch.cuda.is_available()


def accelerator(mixed_precision: str) -> Accelerator:
    """An ``Accelerator`` with ``mixed_precision`` (on the GPU when one is visible, else the CPU).

    accelerate keeps one shared state per process, so a second ``train()`` in one process with another
    ``mixed_precision`` would be refused by it: in a single process that state, left by the finished earlier
    run (or by the caller's own ``Accelerator``), is reset first -- which changes the mixed precision that
    ``Accelerator`` reports too; :func:`run_accelerator` puts it back afterwards. Inside a distributed launch
    the processes share it through their process group, so changing it there is a ``ValueError``: run each
    ``mixed_precision`` in a launch of its own.
    """
    require("accelerate", "training RefDiT")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision 'fp16' needs a GPU (on a CPU it would silently train in float32); "
                         "use 'bf16' or 'no'")
    before = AcceleratorState._shared_state.get("_mixed_precision")
    if before is not None and before != mixed_precision:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ValueError(f"cannot train with mixed_precision {mixed_precision!r}: this process already set up "
                             f"accelerate with {before!r}, and inside a distributed launch that cannot change; "
                             "run each mixed_precision in a launch of its own")
        AcceleratorState._reset_state()  # the earlier run's; the process (device, ranks) state stays
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)


@contextmanager
def run_accelerator(mixed_precision: str) -> Iterator[Accelerator]:
    """:func:`accelerator` for one run; accelerate's shared state is put back as it was when the block ends: an
    ``Accelerator`` the caller holds reports and uses its own ``mixed_precision`` again (:func:`accelerator` may
    have reset it), and where there was none, an ``Accelerator()`` made later (``train-lora``'s) starts afresh
    instead of inheriting this run's ``mixed_precision``."""
    require("accelerate", "training RefDiT")
    from accelerate.state import AcceleratorState

    before = dict(AcceleratorState._shared_state)
    try:
        yield accelerator(mixed_precision)
    finally:
        AcceleratorState._shared_state.clear()
        AcceleratorState._shared_state.update(before)


def all_finite(acc: Accelerator, loss: float) -> bool:
    """Whether every process's loss is finite (all decide together, so none waits alone in the next sync)."""
    return not any_process(acc, not math.isfinite(loss))


def any_process(acc: Accelerator, mine: bool) -> bool:
    """Whether ``mine`` holds on any process (e.g. one ran out of its wall budget: each has its own clock, and
    one stopping alone would leave the others waiting in the next gradient sync)."""
    if acc.num_processes == 1:
        return mine
    return bool(acc.reduce(torch.tensor([float(mine)], device=acc.device), reduction="sum").item() > 0)


def process_mean(acc: Accelerator, value: float) -> float:
    """The mean of ``value`` over all processes (in float64), the same on each."""
    if acc.num_processes == 1:
        return value
    return float(acc.reduce(torch.tensor([value], dtype=torch.float64, device=acc.device), reduction="mean").item())


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1009 + rank) % 2**63  # below 2**63 (torch seeds): any recipe seed works


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one training step on one process (``rank``): a function of (seed, step, rank) only, so a
    resumed run draws what an uninterrupted one would, and each process draws its own samples."""
    return torch.Generator().manual_seed(_step_seed(seed, step, rank))


def side_generator(seed: int, step: int, rank: int, salt: int) -> torch.Generator:
    """A step's draws for one optional feature (routing, condition dropout): a stream of its own, so turning
    the feature on leaves the noise, t and reference-dropping draws of the main stream unchanged."""
    return torch.Generator().manual_seed(_step_seed(seed, step, rank) ^ (salt << 40))
