"""Image conversions between PIL, numpy and ``(B, 3, H, W)`` float tensors in ``[0, 1]``."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from . import checks
from .files import output_folder, published

ImageLike = Image.Image | np.ndarray | Tensor

_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # PIL modes beyond 8 bits: convert("RGB") would clip
_VIA = {"La": "LA"}  # PIL modes with no direct conversion to RGB: through this mode first (premultiplied alpha)
_TOL = 1e-3  # float images may overshoot [0, 1] by this much (resampling)


def to_tensor(image: ImageLike) -> Tensor:
    """One image -> ``(3, H, W)`` float32 in [0, 1]; a batch (a 4-D tensor or numpy array) -> ``(B, 3, H, W)``.

    PIL images, numpy arrays and tensors follow one rule: 8-bit and other integer values are divided by 255,
    16-bit ones (uint16, PIL ``I;16``) by 65535, bools are 0 / 1; floats must be in [0, 1] -- except that float
    numpy arrays (and PIL ``F`` images) whose maximum exceeds 1 are read as 0-255. Layouts: ``(H, W)``,
    ``(H, W, C)`` and ``(C, H, W)`` with C = 1 (grayscale, made RGB), 3 or 4 (alpha dropped); batches
    ``(B, H, W, C)`` or ``(B, C, H, W)`` (a float numpy batch is read as 0-255 if any value exceeds 1). A shape that
    fits both layouts, such as ``(3, 4, 3)``, follows its library's convention: channels-first for a tensor,
    channels-last for a numpy array (as PIL gives it). Raises
    ``ValueError`` for values that are not finite or out of range, or another number of channels, and
    ``TypeError`` for other objects.
    """
    if isinstance(image, Image.Image):
        if image.mode in _WIDE_MODES:  # 16/32-bit and float: keep their range
            arr = np.asarray(image)
            if image.mode == "I" and arr.size and 255 < arr.max() <= 65535 and arr.min() >= 0:
                arr = arr.astype(np.uint16)  # a 16-bit PNG opened as 32-bit integers
            return to_tensor(arr)
        try:
            rgb = image.convert(_VIA[image.mode]).convert("RGB") if image.mode in _VIA else image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise ValueError(f"cannot read a PIL image in mode {image.mode!r} as RGB ({exc})") from None
        return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        if image.dtype.kind not in "biuf":
            raise TypeError(f"a numpy image must hold numbers, got dtype {image.dtype}")
        if image.ndim == 4 and image.shape[0] == 0:
            raise ValueError(_empty_batch(image.shape))
        if image.ndim not in (2, 3, 4):
            raise ValueError(f"a numpy image must be (H, W), (H, W, C) or (C, H, W), or a batch of them "
                             f"(B, H, W, C) / (B, C, H, W); got shape {image.shape}")
        if image.ndim == 4:  # a batch: one scale for all (a dark frame of a 0-255 batch stays dark)
            if image.dtype.kind == "f" and image.size and float(image.max()) > 1.0 + _TOL:
                image = image / 255.0
            out = []
            for i, x in enumerate(image):
                try:
                    out.append(to_tensor(x))
                except ValueError as exc:
                    raise ValueError(f"image {i} of the batch of shape {image.shape}: {exc}") from None
            return torch.stack(out)
        if image.dtype.kind != "f":
            t = torch.from_numpy(_scaled(image))
        else:
            t = torch.from_numpy(image.astype(np.float32))
            if t.numel() and float(t.max()) > 1.0 + _TOL:
                t = t / 255.0  # a float array holding 0-255 values
        t = _channels_first(t, image.shape)
    elif isinstance(image, Tensor):
        if image.is_complex():
            raise TypeError("image tensors must be real, got a complex tensor")
        if image.is_meta or image.layout != torch.strided:
            kind = "meta" if image.is_meta else image.layout
            raise TypeError(f"image tensors must be dense and hold data, got a {kind} tensor")
        if image.dim() == 4 and image.shape[0] == 0:
            raise ValueError(_empty_batch(tuple(image.shape)))
        if image.dim() not in (2, 3, 4):
            raise ValueError(f"an image tensor must be (H, W), (H, W, C) or (C, H, W), or a batch of them "
                             f"(B, H, W, C) / (B, C, H, W); got shape {tuple(image.shape)}")
        t = image.float() if image.is_floating_point() else torch.from_numpy(_scaled(image.cpu().numpy()))
        t = t.to(image.device)
        if t.dim() == 2 or (t.dim() == 3 and t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3, 4)):
            t = _channels_first(t, tuple(image.shape))  # (H, W) or (H, W, C) with an unambiguous layout
        elif t.dim() == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):
            t = t.permute(0, 3, 1, 2)  # a (B, H, W, C) batch
        if t.dim() in (3, 4) and t.shape[-3] not in (1, 3, 4):
            raise ValueError(f"an image needs 1, 3 or 4 channels (first or last), got shape {tuple(image.shape)}")
        if t.dim() in (3, 4) and t.shape[-3] == 1:  # grayscale (1, H, W) / (B, 1, H, W)
            t = t.expand(*t.shape[:-3], 3, *t.shape[-2:])
        elif t.dim() in (3, 4) and t.shape[-3] == 4:  # RGBA: drop alpha
            t = t[..., :3, :, :]
    else:
        raise TypeError(f"expected a PIL image, numpy array or tensor, got {type(image).__name__}")
    if t.numel():
        lo, hi = float(t.detach().min()), float(t.detach().max())  # a tensor that requires grad: no warning
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("image values must be finite (got NaN or inf)")
        if lo < -_TOL or hi > 1.0 + _TOL:
            raise ValueError(f"image values must be in [0, 1] (integer images are divided by 255, 16-bit ones "
                             f"by 65535), got [{lo:.3g}, {hi:.3g}]")
    return t


def _empty_batch(shape: tuple[int, ...]) -> str:
    """The message for a 4-D batch of zero images (it was the generic "must be (H, W), ..." shape message)."""
    return f"got an empty batch of images (zero images, shape {shape}): a batch needs at least one image"


def _scaled(arr: np.ndarray) -> np.ndarray:
    """A bool / integer array as float32 in [0, 1] (16-bit by 65535, other integers by 255)."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    sixteen = arr.dtype.kind == "u" and arr.dtype.itemsize == 2  # uint16, either byte order
    return arr.astype(np.float32) / (65535.0 if sixteen else 255.0)


def _channels_first(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``(H, W)`` / ``(H, W, C)`` / ``(C, H, W)`` (C in 1, 3, 4) -> ``(3, H, W)``; ``shape`` names the input."""
    if t.dim() == 2:
        t = t[None]
    else:
        first, last = t.shape[0], t.shape[-1]
        if not ((first in (1, 3) and last not in (1, 3)) or (first == 4 and last not in (1, 3, 4))):
            t = t.permute(2, 0, 1)  # channels last (the numpy convention when both ends could be channels)
        if t.shape[0] not in (1, 3, 4):
            raise ValueError(f"an image needs 1, 3 or 4 channels (first or last), got shape {tuple(shape)}")
    if t.shape[0] == 4:
        t = t[:3]
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t.contiguous()


def batch_images(images: list[ImageLike], batch: int | None = None) -> list[Tensor]:
    """A list of images -> a list of ``(B, C, H, W)`` tensors (single images repeated to ``batch``)."""
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"references must be a list of images, got {type(images).__name__}")
    if batch is not None:
        batch = checks.integer("batch", batch, lo=1)
    out = []
    for i, img in enumerate(images):
        try:
            t = to_tensor(img)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"reference {i}: {exc}") from None
        if t.dim() == 3:
            t = t.unsqueeze(0)
        if t.dim() != 4:
            raise ValueError(f"reference {i} has shape {tuple(t.shape)}; expected (3, H, W) or (B, 3, H, W)")
        if batch is not None and t.shape[0] == 1 and batch > 1:
            t = t.expand(batch, -1, -1, -1)
        out.append(t)
    return out


MAX_SIDE = 8192
"""Largest image side the CLI and LoRA training accept: far above what FLUX.2 / Kontext / Qwen-Image work at
(about 2048); a bigger image only exhausts memory."""


class LargeImageWarning(Image.DecompressionBombWarning):
    """PIL's ``DecompressionBombWarning`` for a file :func:`load_rgb` reads (over ``PIL.Image.MAX_IMAGE_PIXELS``,
    about 89 megapixels, but not over twice that, which is an error), naming the file: ``path``, and PIL's own
    message as ``detail``. A subclass, so filters on PIL's category apply to it."""

    def __init__(self, path: str | os.PathLike, detail: str) -> None:
        super().__init__(f"image {path}: {detail}")
        self.path, self.detail = path, detail

    def __reduce__(self) -> tuple:  # pickled (a worker process's error under -W error) and copied by its fields
        return type(self), (self.path, self.detail)


def _open(path: str | os.PathLike) -> Image.Image:
    """``Image.open(path)``, with PIL's decompression-bomb warning raised again as a :class:`LargeImageWarning` that
    names ``path`` (PIL's names no file). The file is opened once: a pipe (``--ref <(cat big.png)``) is read once."""
    source: str | os.PathLike | io.BytesIO = path
    if not stat.S_ISREG(os.stat(path).st_mode):  # a pipe, a device: read here (PIL's own read leaks the file)
        with open(path, "rb") as f:
            source = io.BytesIO(f.read())
    with warnings.catch_warnings(record=True) as caught:  # every warning open gives, to be warned again below
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except Image.UnidentifiedImageError:
            raise ValueError(f"cannot identify image file {os.fspath(path)!r}") from None  # not the BytesIO's repr
    try:
        for w in caught:
            if issubclass(w.category, Image.DecompressionBombWarning):
                warnings.warn(LargeImageWarning(path, str(w.message)), stacklevel=4)  # at load_rgb's caller
            else:  # another warning of PIL's, as if not caught
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    except BaseException:  # a filter that makes one an error
        image.close()
        raise
    return image


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """An image file as 8-bit RGB PIL, 16-bit and float files rescaled (``convert("RGB")`` clips them), turned
    upright by its EXIF orientation as image viewers and diffusers' ``load_image`` show it (phone photos).

    ``FileNotFoundError`` for a missing file; ``ValueError`` naming the file for one that is not a readable image
    (corrupt, truncated, another format, or a decompression bomb: over twice ``PIL.Image.MAX_IMAGE_PIXELS``); a
    :class:`LargeImageWarning` naming it for one over that limit but not over twice it (loaded all the same)."""
    return _load(path, alpha=False, name="load_rgb")


def load_rgba(path: str | os.PathLike) -> Image.Image:
    """An image file as 8-bit RGBA PIL: the RGB channels exactly :func:`load_rgb`'s (so ``.convert("RGB")`` gives
    what it gives), the alpha the file's -- an alpha channel, or a palette's or colour's transparency -- and opaque
    where it has none (what pipelines that read RGBA pixels, such as Qwen-Image-Layered, take). Errors and warnings
    as :func:`load_rgb`'s."""
    return _load(path, alpha=True, name="load_rgba")


def _load(path: str | os.PathLike, alpha: bool, name: str) -> Image.Image:
    """:func:`load_rgb` (``alpha`` False) or :func:`load_rgba` (True), ``name`` naming it in a ``TypeError``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} takes an image file path (str or os.PathLike), got {type(path).__name__}")
    try:
        with _open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = to_pil(to_tensor(im)) if im.mode in _WIDE_MODES else im.convert("RGB")
            if not alpha:
                return rgb
            if "A" in im.getbands():  # RGBA, LA, La, PA, RGBa
                rgb.putalpha(im.getchannel("A"))
            elif "transparency" in im.info:  # a palette's transparent entries, or one transparent colour
                rgb.putalpha(im.convert("RGBA").getchannel("A"))
            else:
                rgb.putalpha(255)
            return rgb
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # SyntaxError: some plugins
        raise ValueError(f"cannot read image {path}: {exc}") from None


def to_pil(image: Tensor) -> Image.Image:
    """``(3, H, W)`` float in [0, 1] -> PIL RGB (``TypeError`` for a non-tensor or an integer one, ``ValueError`` for
    another shape or for NaN / inf values, which have no pixel value)."""
    if not isinstance(image, Tensor):
        raise TypeError(f"to_pil expects a (3, H, W) tensor, got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"to_pil expects a (3, H, W) image tensor, got shape {tuple(image.shape)}")
    if not image.is_floating_point():  # clamped to [0, 1], 8-bit values would all turn white
        raise TypeError(f"to_pil expects a float tensor in [0, 1], got {image.dtype} (to_tensor converts 8- and "
                        "16-bit images)")
    bad = int((~torch.isfinite(image.detach())).sum())
    if bad:  # clamp() left NaN, which became 0 (black), and made inf white: a diverged model's output, saved
        raise ValueError(f"to_pil: the image has {bad} of {image.numel()} values that are not finite (NaN or inf), "
                         "as from a model that diverged")
    if image.dtype == torch.bfloat16:  # numpy has no bfloat16
        image = image.float()
    arr = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr)


_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "I;16B")  # modes PIL writes to PNG as they are


def check_png_path(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path``; ``ValueError`` unless it ends in ``.png`` (any case)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output path must end in .png, got {str(path)!r}")
    return path


def _png_image(image: Tensor | Image.Image, path: Path) -> Image.Image:
    """``image`` as a PIL image PNG holds (a tensor through :func:`to_pil`; a mode PNG cannot hold -- float ``F``,
    CMYK, YCbCr, ... -- as 8-bit RGB); ``TypeError`` / ``ValueError`` naming ``path`` where it cannot be one."""
    try:
        if isinstance(image, Image.Image):
            pil = image if image.mode in _PNG_MODES else to_pil(to_tensor(image))
        else:
            pil = to_pil(image)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"cannot write {path}: {exc}") from None
    if 0 in pil.size:  # PIL's own error named no file: "cannot write empty image"
        raise ValueError(f"cannot write {path}: a PNG needs at least one pixel, the image is {pil.width}x{pil.height}")
    return pil


def save_png(image: Tensor | Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG atomically (temp file in the same folder + rename), creating parent folders.

    Nothing is left on disk if writing fails, nor the folders it created; an ``OSError`` (no permission, disk full)
    names ``path``, not the temp file. A tensor is converted by :func:`to_pil` first, whose errors (a wrong shape or
    dtype, NaN / inf values) name ``path`` too and leave nothing on disk, as does an image of no pixels.
    """
    return save_pngs([image], [path])[0]


def save_pngs(images: list[Tensor | Image.Image], paths: list[str | os.PathLike]) -> list[Path]:
    """Write ``images[i]`` to ``paths[i]`` as PNGs, as a set: every image is converted and written to a temp file
    beside its path before any path is replaced, then all are renamed with Ctrl-C held
    (:func:`~tokensparse.files.published` ``as_set``), creating parent folders. A failure or Ctrl-C before the
    renames replaces none of the paths and leaves no temp file, nor the folders made for them; errors name the path
    as :func:`save_png`'s do. ``ValueError`` for lists of different lengths, an empty one, or a path given twice."""
    if not isinstance(images, (list, tuple)) or not isinstance(paths, (list, tuple)):
        raise TypeError(f"save_pngs takes a list of images and a list of paths, got {type(images).__name__} and "
                        f"{type(paths).__name__}")
    if len(images) != len(paths) or not paths:
        raise ValueError(f"save_pngs needs one path per image (at least one), got {len(images)} image(s) and "
                         f"{len(paths)} path(s)")
    paths = [check_png_path(p) for p in paths]
    if len({p.absolute() for p in paths}) != len(paths):
        raise ValueError(f"save_pngs: a path is given twice in {[str(p) for p in paths]}")
    pils = [_png_image(image, path) for image, path in zip(images, paths, strict=True)]
    written = 0  # the path that failed: its temp file was being written, or it was being renamed onto
    try:
        # the folders it makes are removed again if the write fails; unique temp files: writers do not collide
        with contextlib.ExitStack() as stack:
            for folder in dict.fromkeys(p.parent for p in paths):
                stack.enter_context(output_folder(folder))
            tmps = stack.enter_context(published(*paths, as_set=True))
            for i, (pil, tmp) in enumerate(zip(pils, tmps, strict=True)):
                written = i
                pil.save(tmp, format="PNG")
    except OSError as exc:
        raise OSError(f"cannot write {_failed(exc, paths, paths[written])}: {exc.strerror or exc}") from exc
    return paths


def _failed(exc: OSError, paths: list[Path], default: Path) -> Path:
    """The one of ``paths`` an ``OSError`` of :func:`save_pngs` is about (the file it names, or that file's temp
    file), else ``default``."""
    for name in (exc.filename2, exc.filename):
        if isinstance(name, (str, os.PathLike)):
            for path in paths:
                if Path(name) == path or Path(name).name.startswith(f".{path.name}."):
                    return path
    return default
