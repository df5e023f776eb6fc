"""Quality metrics against exact ground truth: per-image PSNR / SSIM / coarse (layout) PSNR, 95 % intervals,
and per-task / per-family summaries. (FLOP counting lives in :mod:`tokensparse.flops`.)

All image inputs are float tensors (N, 3, H, W) with values in [0, 1]; every metric returns one value per
image, shape (N,), so callers can average, bootstrap or group as they like. Metrics compute in float32, or in
float64 when either input is float64 (their values are then float64).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from . import checks

__all__ = ["coarse_psnr", "fid", "mean_ci95", "psnr", "ssim", "summarize"]


def _float_images(name: str, x: object) -> None:
    """``TypeError`` unless ``x`` is a float tensor: integer images (0-255) would be scored as if in [0, 1]."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a float tensor of images in [0, 1], got {got} "
                        "(tokensparse.images.to_tensor converts 8- and 16-bit images)")


def _finite(name: str, x: torch.Tensor) -> None:
    """``ValueError`` unless every value of the images ``x`` is finite: NaN / inf images come from a model that
    diverged, and would score NaN, or (clamped) as black / white pixels."""
    bad = int((~torch.isfinite(x.detach())).sum())
    if bad:
        raise ValueError(f"{name} images must be finite, got {bad} of {x.numel()} values NaN or inf")


def _in_unit_range(name: str, x: torch.Tensor) -> None:
    """``ValueError`` unless the images ``x`` (the reference side of a metric) are finite and in [0, 1] (to
    1e-3)."""
    _finite(name, x)
    lo, hi = (float(x.detach().min()), float(x.detach().max())) if x.numel() else (0.0, 1.0)
    if not -1e-3 <= lo <= hi <= 1 + 1e-3:
        raise ValueError(f"{name} images must be in [0, 1], got [{lo:.3g}, {hi:.3g}]")


def _check(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _float_images("pred", pred)
    _float_images("target", target)
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(
            f"pred and target must both be (N, C, H, W) of one shape, got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if 0 in pred.shape[1:]:  # a per-image score of no pixels: psnr was nan, ssim failed inside torchmetrics
        raise ValueError(f"pred and target images need at least one pixel and channel, got {tuple(pred.shape)}")
    _finite("pred", pred)
    # float32, or float64 when either side is: differences below float32's resolution (1e-12 between float64
    # images) were rounded away, and psnr read them as identical (inf)
    dtype = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    target = target.detach().to(dtype)
    _in_unit_range("target", target)
    return pred.detach().to(dtype).clamp(0, 1), target


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB with data range 1: ``10 log10(1 / MSE)``; ``inf`` where the images are identical.

    ``pred`` is clamped to [0, 1] first (a model's raw output is scored as the image it would display); NaN or
    inf in ``pred`` or ``target`` is a ``ValueError`` naming it (as for :func:`ssim` and :func:`coarse_psnr`).
    """
    pred, target = _check(pred, target)
    return peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (torchmetrics, Gaussian window 11, sigma 1.5, data range 1); 1 for identical images.

    Images smaller than the window (< 11 px) use the largest odd window that fits.
    """
    pred, target = _check(pred, target)
    if pred.shape[0] == 0:
        return torch.zeros(0)
    k = min(11, (min(pred.shape[-2:]) - 1) | 1)
    return structural_similarity_index_measure(
        pred, target, data_range=1.0, reduction="none", kernel_size=k, sigma=1.5 * k / 11
    )


def coarse_psnr(pred: torch.Tensor, target: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """PSNR after average-pooling both images by ``factor`` (the *layout* metric: right colours in the right
    places, fine detail ignored). With 4x4 patches and ``factor=4`` it compares per-token mean colours; where
    ``factor`` does not divide the size, the partial cells at the bottom / right edge are averaged too."""
    pred, target = _check(pred, target)
    factor = checks.integer("factor", factor, lo=1)
    if factor > min(pred.shape[-2:]):
        raise ValueError(f"factor {factor} is larger than the {pred.shape[-2]}x{pred.shape[-1]} images")
    if factor > 1:
        pred, target = (F.avg_pool2d(v, factor, ceil_mode=True) for v in (pred, target))
    return psnr(pred, target)


def fid(generated: torch.Tensor, real: torch.Tensor, feature_net: torch.nn.Module | None = None,
        batch_size: int = 256) -> float:
    """Fréchet distance between two image sets ``(N, 3, H, W)`` in [0, 1] in the shipped FeatureNet's space.

    torchmetrics' ``FrechetInceptionDistance`` with :class:`tokensparse.features.FeatureNet` (trained on the task
    suite, 64 features) in place of Inception, so no weights are downloaded. Needs >= 2 images per set;
    like every FID it is biased upward for small sets, so compare values computed with equal set sizes. NaN or
    inf in either set is a ``ValueError`` naming it; ``generated`` images are clamped to [0, 1], as psnr's pred.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    from .features import load_feature_net

    for name, x in (("generated", generated), ("real", real)):
        _float_images(name, x)
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] < 2:
            raise ValueError(f"{name} images must be (N >= 2, 3, H, W), got {tuple(x.shape)}")
        _finite(name, x)  # NaN features crash scipy's matrix square root (MKL), not raise
    _in_unit_range("real", real)  # as psnr's target
    if min(generated.shape[-2:]) < 8 or min(real.shape[-2:]) < 8:
        raise ValueError(f"fid's feature network needs images of at least 8x8, got {tuple(generated.shape[-2:])} and "
                         f"{tuple(real.shape[-2:])}")
    if generated.shape[-2:] != real.shape[-2:]:
        raise ValueError(f"generated and real images must have one size, got {tuple(generated.shape[-2:])} and "
                         f"{tuple(real.shape[-2:])}")
    batch_size = checks.integer("batch_size", batch_size, lo=1)
    net = feature_net if feature_net is not None else load_feature_net()
    metric = FrechetInceptionDistance(feature=net, normalize=True)
    with torch.no_grad():
        for x, is_real in ((real, True), (generated, False)):
            for i in range(0, x.shape[0], batch_size):
                metric.update(x[i : i + batch_size].detach().float().clamp(0, 1), real=is_real)
        return float(metric.compute())


def _kind(x: object) -> str:
    """How an error message names the type of ``x``: a tensor by its dtype, a string with its value."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor"
    return f"the string {x!r}" if isinstance(x, (str, bytes)) else type(x).__name__


def mean_ci95(values: torch.Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (normal approximation, 1.96 standard errors
    with the sample standard deviation). Half-width is ``nan`` for fewer than two values.

    ``values``: a real tensor or a sequence of real numbers (``TypeError`` otherwise), at least one, none NaN
    (``ValueError``). Infinite values are kept: :func:`psnr` is ``inf`` for identical images, and their mean is too.
    """
    if isinstance(values, (str, bytes)) or (isinstance(values, torch.Tensor) and values.is_complex()):
        raise TypeError(f"values must be a real tensor or a sequence of real numbers, got {_kind(values)}")
    try:
        v = torch.as_tensor(values, dtype=torch.float64).flatten()
    except (TypeError, ValueError) as exc:  # e.g. None, a list of strings, a ragged nested list
        raise TypeError(f"values must be a real tensor or a sequence of real numbers, got {_kind(values)} "
                        f"({exc})") from None
    if v.numel() == 0:
        raise ValueError("mean_ci95 needs at least one value (values is empty)")
    nan = int(torch.isnan(v).sum())
    if nan:  # a NaN mean and interval, silently
        raise ValueError(f"values must not hold NaN, got {nan} of {v.numel()}")
    mean = float(v.mean())
    if v.numel() < 2:
        return mean, math.nan
    return mean, float(1.96 * v.std(unbiased=True) / math.sqrt(v.numel()))


def summarize(per_sample: dict[str, torch.Tensor], tasks: Sequence[str]) -> dict:
    """Group per-sample metric values by task and by family.

    Args:
        per_sample: metric name -> (N,) values, e.g. ``{"psnr": psnr(p, t), "ssim": ssim(p, t)}``.
        tasks: the N task names, aligned with the values.

    Returns:
        ``{"per_task": {task: {metric: {"mean", "ci95", "n"}}}, "per_family": {family: {...}},
        "overall": {metric: {...}}}``; families follow ``tokensparse.data.ALL_FAMILIES`` order (the open family,
        e.g. ``scene`` samples, last), tasks first-seen order; a family with no sample is left out. Family and
        overall means are over samples (held-out sets are balanced over tasks).
    """
    from .data import ALL_FAMILIES, TASKS  # local: metrics stays importable without building any data

    if not isinstance(per_sample, Mapping):
        raise TypeError(f"per_sample must be a dict of metric name -> per-sample values, got "
                        f"{type(per_sample).__name__}")
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a list of task names, one per sample, got the string {tasks!r}")
    if not per_sample:
        raise ValueError("summarize needs at least one metric (per_sample is empty)")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("summarize needs at least one sample (tasks is empty)")
    not_str = next((t for t in tasks if not isinstance(t, str)), None)
    if not_str is not None:  # was "unhashable type" for a list, or a failed sort of the unknown names
        raise TypeError(f"tasks must be task names (strings), got {type(not_str).__name__} {not_str!r}")
    for name, vals in per_sample.items():
        if not isinstance(vals, torch.Tensor):
            raise TypeError(f"metric {name!r} must be a tensor of per-sample values, got {type(vals).__name__}")
        if vals.numel() != len(tasks):
            raise ValueError(f"metric {name!r} has {vals.numel()} values for {len(tasks)} tasks")
        try:  # mean_ci95's checks (real values, no NaN) on all of them, before any group
            mean_ci95(vals.detach().flatten().cpu())
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"metric {name!r}: {exc}") from None
    unknown = sorted({t for t in tasks if t not in TASKS})
    if unknown:
        raise ValueError(f"unknown task names {unknown}")

    def stats(idx: list[int]) -> dict[str, dict[str, float]]:
        out = {}
        for name, vals in per_sample.items():
            m, ci = mean_ci95(vals.detach().flatten()[idx].cpu())
            out[name] = {"mean": m, "ci95": ci, "n": len(idx)}
        return out

    per_task = {t: stats([i for i, x in enumerate(tasks) if x == t]) for t in dict.fromkeys(tasks)}
    per_family = {}
    for fam in ALL_FAMILIES:  # the open family too: its samples were left out of every family, silently
        idx = [i for i, x in enumerate(tasks) if TASKS[x].family == fam]
        if idx:
            per_family[fam] = stats(idx)
    return {"per_task": per_task, "per_family": per_family, "overall": stats(list(range(len(tasks))))}
