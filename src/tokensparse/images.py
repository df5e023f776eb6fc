"""Image conversions between PIL, numpy and ``(B, 3, H, W)`` float tensors in ``[0, 1]``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

ImageLike = Image.Image | np.ndarray | Tensor


def to_tensor(image: ImageLike) -> Tensor:
    """One image -> ``(3, H, W)`` float32 in [0, 1]; a ``(B, 3, H, W)`` tensor passes through.

    Integer arrays and tensors (uint8) are divided by 255; float arrays above 1 are read as 0-255 too; float
    tensors must already be in [0, 1]. Single-channel images become RGB. Raises ``ValueError`` for values that
    are not finite or out of range, ``TypeError`` for other objects.
    """
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise ValueError(f"a numpy image must be (H, W), (H, W, 3) or (3, H, W), got shape {image.shape}")
        arr = image.astype(np.float32)
        if np.issubdtype(image.dtype, np.integer) or (arr.size and arr.max() > 1.0):
            arr = arr / 255.0
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):  # channels first (3, H, W)
            arr = arr.transpose(1, 2, 0)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    elif isinstance(image, Tensor):
        t = image.float() / 255.0 if not (image.is_floating_point() or image.is_complex()) else image.float()
        if t.dim() in (3, 4) and t.shape[-3] == 1:  # grayscale (1, H, W) / (B, 1, H, W)
            t = t.expand(*t.shape[:-3], 3, *t.shape[-2:])
    else:
        raise TypeError(f"expected a PIL image, numpy array or tensor, got {type(image).__name__}")
    if t.numel():
        lo, hi = float(t.min()), float(t.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("image values must be finite (got NaN or inf)")
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"image values must be in [0, 1] (uint8 images are divided by 255), "
                             f"got [{lo:.3g}, {hi:.3g}]")
    return t


def batch_images(images: list[ImageLike], batch: int | None = None) -> list[Tensor]:
    """A list of images -> a list of ``(B, C, H, W)`` tensors (single images repeated to ``batch``)."""
    out = []
    for i, img in enumerate(images):
        t = to_tensor(img)
        if t.dim() == 3:
            t = t.unsqueeze(0)
        if t.dim() != 4:
            raise ValueError(f"reference {i} has shape {tuple(t.shape)}; expected (3, H, W) or (B, 3, H, W)")
        if batch is not None and t.shape[0] == 1 and batch > 1:
            t = t.expand(batch, -1, -1, -1)
        out.append(t)
    return out


def to_pil(image: Tensor) -> Image.Image:
    """``(3, H, W)`` in [0, 1] -> PIL RGB."""
    arr = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr)


def save_png(image: Tensor | Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG atomically (temp file in the same folder + rename), creating parent folders.

    Nothing is left on disk if writing fails.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output path must end in .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pil.save(f, format="PNG")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
