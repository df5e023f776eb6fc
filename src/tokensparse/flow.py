"""Rectified flow: the straight path from data (t=0) to noise (t=1), its loss, and the Euler sampler.

    x_t = (1 - t) * x0 + t * eps          velocity  v = eps - x0          dx/dt = v

Every sampler here has one signature, ``sampler(denoise, x, timesteps, callback=None) -> x0``, where
``denoise(x, t) -> v`` takes ``t`` of shape ``(B,)``; guidance and sparsity wrap ``denoise``. ``callback(i, x)``
runs after step ``i`` with the live sample and may change it, as a diffusers ``callback_on_step_end`` may change
its latents: an in-place edit of ``x``, or a returned tensor of ``x``'s shape (which replaces it), is what the
next step continues from (:func:`step_callback`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from . import checks

Denoiser = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor], "Tensor | None"]


class Sampler(Protocol):
    def __call__(self, denoise: Denoiser, x: Tensor, timesteps: Tensor,
                 callback: StepCallback | None = None) -> Tensor: ...


def step_callback(callback: StepCallback, i: int, x: Tensor) -> Tensor:
    """Run ``callback(i, x)`` after step ``i`` and return the sample the sampler continues from: ``x`` itself (with
    any in-place edit the callback made), or the tensor the callback returned, which replaces it (cast to ``x``'s
    dtype and device). Returns other than a tensor (``None``, a progress bar's ``update``) are ignored.
    ``ValueError`` for a returned tensor of another shape, ``TypeError`` for one that is not floating point."""
    out = callback(i, x)
    if not isinstance(out, Tensor) or out is x:
        return x
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"callback returned a tensor of shape {tuple(out.shape)} after step {i}; it replaces the "
                         f"sample, which is {tuple(x.shape)}: return a sample of that shape, or None to keep it")
    if not out.is_floating_point():
        raise TypeError(f"callback returned a {out.dtype} tensor after step {i}; it replaces the sample, which is "
                        f"{x.dtype}: return a floating-point sample, or None to keep it")
    return out.to(dtype=x.dtype, device=x.device)


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Point ``x_t`` on the path for per-sample ``t (B,)``."""
    t = t.reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def velocity(x0: Tensor, noise: Tensor) -> Tensor:
    """The regression target ``eps - x0``."""
    return noise - x0


def sample_t(batch: int, generator: torch.Generator | None = None, logit_normal: bool = True) -> Tensor:
    """Training times in (0, 1): logit-normal (SD3's choice, more weight mid-path) or uniform."""
    if logit_normal:
        return torch.sigmoid(torch.randn(batch, generator=generator))
    return torch.rand(batch, generator=generator)


def flow_loss(denoise: Denoiser, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Mean squared velocity error at ``t``."""
    return (denoise(interpolate(x0, noise, t), t) - velocity(x0, noise)).pow(2).mean()


def check_shift(shift: object) -> float:
    """``shift`` as a float in ``[1e-4, 1e4]`` (beyond it float32 times degenerate to 0/0 or inf/inf)."""
    return checks.real("shift", shift, 1e-4, 1e4)


MAX_STEPS = 100_000
"""Most denoising steps a sampler takes: far beyond any useful count (tens to a thousand); a larger count (a typo,
``10**12``) would run for days, or fail allocating its times with the allocator's message."""


def check_steps(steps: object) -> int:
    """``steps`` as an int in ``[1, MAX_STEPS]``."""
    return checks.integer("steps", steps, 1, MAX_STEPS)


def timesteps(steps: int, shift: float = 1.0) -> Tensor:
    """``steps + 1`` times from 1 to 0; ``shift > 1`` spends more steps near noise (SD3 shift; ``shift`` in
    ``[1e-4, 1e4]``); ``steps`` in ``[1, MAX_STEPS]``."""
    steps = check_steps(steps)
    shift = check_shift(shift)
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)
    out = (shift * t / (1 + (shift - 1) * t)).clamp_(0.0, 1.0)
    out[0] = 1.0  # float32 rounding can put it at 1.0000001 (e.g. shift 1.32), and the model takes t in [0, 1]
    return out


def noise_like(shape: tuple[int, ...], seeds: list[int], device: torch.device | str = "cpu") -> Tensor:
    """float32 Gaussian noise with one generator per sample, so a sample's noise never depends on its batch (nor on
    ``torch.get_default_dtype()``)."""
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]}")
    seeds = [checks.integer("seed", s, 0, 2**64 - 1) for s in seeds]  # what a torch generator takes
    out = [torch.randn(shape[1:], generator=torch.Generator().manual_seed(s), dtype=torch.float32) for s in seeds]
    return torch.stack(out).to(device)


@torch.no_grad()
def euler(denoise: Denoiser, x: Tensor, timesteps: Tensor,
          callback: StepCallback | None = None) -> Tensor:
    """First-order ODE solve from ``timesteps[0]`` to ``timesteps[-1]``; ``callback``: see :func:`step_callback`."""
    for i in range(len(timesteps) - 1):
        t, t_next = float(timesteps[i]), float(timesteps[i + 1])
        v = denoise(x, torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device))
        x = x + (t_next - t) * v
        if callback is not None:
            x = step_callback(callback, i, x)
    return x


SAMPLERS: dict[str, Sampler] = {"euler": euler}
