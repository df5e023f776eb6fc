"""Precomputed content banks for the task suite: photo textures, subjects, named colours and backgrounds.

Everything here is built once per image size, lazily, with a fixed seed, and cached in memory. Real content
comes only from images that ship inside installed wheels (no network, read directly with PIL/numpy):
scikit-image sample images (astronaut, coffee, chelsea, rocket, ihc; brick/grass/gravel textures; the
``lfw_subset`` faces) and scikit-learn's two sample photos (china, flower).

Banks store numpy ``float32`` arrays in channel-first layout; per-sample code in :mod:`.tasks` only slices and
blends them, which is what makes sample generation fast.
"""

from __future__ import annotations

import functools
import importlib.util
import numbers
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import checks

BANK_SEED = 20261122
NUM_PHOTO_SUBJECTS = 1024
MIN_SUBJECT_STD = 0.08
HELDOUT_SUBJECT_EVERY = 8  # every 8th subject of the bank is reserved for held-out samples

# Named colours: prompt word -> RGB in [0, 1]. Order is part of the data definition; append only.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "cyan": (0.10, 0.85, 0.90),
    "magenta": (0.90, 0.15, 0.85),
    "white": (0.97, 0.97, 0.97),
    "black": (0.05, 0.05, 0.05),
    "gray": (0.50, 0.50, 0.50),
    "orange": (1.00, 0.55, 0.05),
    "purple": (0.50, 0.15, 0.70),
    "brown": (0.55, 0.35, 0.15),
}
OBJECT_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "cyan", "magenta")  # editing objects
PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots", "gradient")
ROWS: tuple[str, ...] = ("top", "center", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
SIZES: tuple[str, ...] = ("small", "medium", "large")
REF_SIZES: tuple[str, ...] = (
    "small",
    "medium",
)  # sizes a subject is shown at in a reference (<= 25 % tokens)

# Photos read straight from the installed wheels (no network, no heavy imports): (package, relative path).
_COLOR_PHOTOS = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/ihc.png"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
)
_GRAY_PHOTOS = (("skimage", "data/brick.png"), ("skimage", "data/grass.png"), ("skimage", "data/gravel.png"))
_FACES = ("skimage", "data/lfw_subset.npy")


def check_size(image_size: int) -> int:
    """``image_size`` as an int; ``ValueError`` unless it is a multiple of 8 in [16, 256] (numpy ints, 0-d tensors
    and arrays accepted, as :mod:`tokensparse.checks` accepts them)."""
    image_size = checks.scalar(image_size)
    if (isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size % 8
            or not 16 <= image_size <= 256):
        raise ValueError(f"image_size must be a multiple of 8 in [16, 256], got {image_size!r}")
    return int(image_size)


def size_px(size_word: str, image_size: int) -> int:
    """Side in pixels of a subject of the named size: small S/4, medium 3S/8, large S/2."""
    return {"small": image_size // 4, "medium": 3 * image_size // 8, "large": image_size // 2}[size_word]


def cell_xy(row: str, col: str, side: int, image_size: int) -> tuple[int, int]:
    """Top-left ``(y, x)`` of a ``side``-pixel square at the named 3x3 cell (margin S/16 at the borders)."""
    margin = image_size // 16

    def coord(i: int) -> int:
        return (margin, (image_size - side) // 2, image_size - side - margin)[i]

    return coord(ROWS.index(row)), coord(COLS.index(col))


def _package_file(package: str, rel: str) -> str:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ImportError(f"tokensparse.data needs the {package!r} package for its sample photos")
    path = os.path.join(os.path.dirname(spec.origin), rel)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"sample image {rel!r} not found in the installed {package!r} package: {path}"
        )
    return path


def _read(package: str, rel: str) -> np.ndarray:
    return np.asarray(Image.open(_package_file(package, rel)), dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=1)
def _raw_photos() -> tuple[list[np.ndarray], np.ndarray]:
    """The shipped photos as float32 HWC in [0, 1] and the 200 lfw_subset patches (100 faces, 100 non-faces)
    as float32 (200, 25, 25)."""
    photos = [_read(*p)[..., :3] for p in _COLOR_PHOTOS]
    tints = ((1.0, 0.8, 0.6), (0.6, 0.9, 0.5), (0.8, 0.8, 0.9))
    for p, tint in zip(_GRAY_PHOTOS, tints):  # gray textures, tinted so that they are not all gray
        photos.append(_read(*p)[..., None] * np.asarray(tint, np.float32))
    faces = np.load(_package_file(*_FACES)).astype(np.float32)
    return photos, faces


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Deterministic bilinear resize with antialiasing, (N,C,H,W) -> (N,C,h,w)."""
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


def shape_alpha(shape: str, side: int) -> np.ndarray:
    """Soft (4x supersampled) alpha mask (side, side) in [0, 1] for ``disc``, ``square`` or ``rounded``."""
    ss = 4
    n = side * ss
    c = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1  # pixel centres in (-1, 1)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    if shape == "disc":
        m = xx**2 + yy**2 <= 0.95**2
    elif shape == "square":
        m = (np.abs(xx) <= 0.85) & (np.abs(yy) <= 0.85)
    elif shape == "rounded":
        m = (np.maximum(np.abs(xx) - 0.5, 0) ** 2 + np.maximum(np.abs(yy) - 0.5, 0) ** 2) <= 0.42**2
    elif shape == "diamond":
        m = np.abs(xx) + np.abs(yy) <= 0.95
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m.astype(np.float32).reshape(side, ss, side, ss).mean(axis=(1, 3))


@dataclass(frozen=True)
class Bank:
    """All precomputed content for one image size.

    Attributes:
        image_size: side S of every image.
        textures: float32 (3, h, w) photos (colour ones at short side 1.5 S and 3 S, tinted gray textures at
            2 S) for random S x S crops: editing references and ``compose_scene`` scenes.
        subjects: ``{side: (N, 4, side, side)}`` premultiplied RGBA subjects at the reference sizes (S/4, 3S/8).
        train_subjects / heldout_subjects: disjoint index arrays into the subject axis.
        backgrounds: ``{(colour, pattern): (3, S, S)}`` named target backgrounds.
        object_alpha: ``{(shape, side): (side, side)}`` masks for editing objects.
    """

    image_size: int
    textures: list[np.ndarray]
    subjects: dict[int, np.ndarray]
    train_subjects: np.ndarray
    heldout_subjects: np.ndarray
    backgrounds: dict[tuple[str, str], np.ndarray]
    object_alpha: dict[tuple[str, int], np.ndarray]


def _background(color: str, pattern: str, s: int) -> np.ndarray:
    c = np.array(COLORS[color], dtype=np.float32)[:, None, None]
    img = np.broadcast_to(c, (3, s, s)).copy()
    idx = np.arange(s)
    if pattern == "stripes":  # horizontal stripes, S/8 wide, alternating with a half-white tint
        light = (idx // max(s // 8, 1)) % 2 == 1
        img[:, light, :] = 0.5 * c + 0.5
    elif pattern == "dots":  # half-white dots on a lattice of period S/4
        period = s // 4
        yy, xx = np.meshgrid(idx, idx, indexing="ij")
        d2 = ((yy % period) - (period - 1) / 2) ** 2 + ((xx % period) - (period - 1) / 2) ** 2
        dot = d2 <= (period / 4) ** 2
        img[:, dot] = 0.5 * c[:, :, 0] + 0.5
    elif pattern == "gradient":  # colour at the top fading to 30 % at the bottom
        ramp = np.linspace(1.0, 0.3, s, dtype=np.float32)
        img = img * ramp[None, :, None]
    elif pattern != "plain":
        raise ValueError(f"unknown pattern {pattern!r}")
    return np.ascontiguousarray(img, dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _build(image_size: int) -> Bank:
    s = image_size
    photos, faces = _raw_photos()
    rng = np.random.default_rng(BANK_SEED)
    textures: list[np.ndarray] = []
    work: list[torch.Tensor] = []  # photos at a working resolution for subject crops
    for i, p in enumerate(photos):
        t = torch.from_numpy(np.ascontiguousarray(p.transpose(2, 0, 1)))[None]
        h, w = p.shape[:2]
        colour = i < len(_COLOR_PHOTOS)
        for scale in (1.5, 3.0) if colour else (2.0,):  # gray textures: one scale (they are repetitive)
            k = scale * s / min(h, w)
            textures.append(_resize(t, max(s, round(h * k)), max(s, round(w * k)))[0].numpy())
        if colour:  # subjects are cut from the colour photos only
            k = max(128, 5 * s // 2) / min(h, w)
            work.append(_resize(t, round(h * k), round(w * k))[0])
    sides = [size_px(z, s) for z in REF_SIZES]
    subj: dict[int, list[np.ndarray]] = {d: [] for d in sides}
    alphas = {(sh, d): shape_alpha(sh, d) for sh in ("disc", "rounded", "square", "diamond") for d in sides}
    # photo subjects: random square crops of 15-50 % of the short side, disc or rounded-square shaped
    n_photo = NUM_PHOTO_SUBJECTS if s <= 64 else NUM_PHOTO_SUBJECTS // 4  # big sizes: timing runs only
    while len(subj[sides[0]]) < n_photo:
        src = work[int(rng.integers(len(work)))]
        h, w = src.shape[1:]
        c = int(rng.integers(int(0.15 * min(h, w)), int(0.5 * min(h, w)) + 1))
        y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        crop = src[None, :, y : y + c, x : x + c]
        if float(crop.std()) < MIN_SUBJECT_STD:  # a near-flat crop (sky, wall) is no subject
            continue
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        shape = "disc" if rng.random() < 0.5 else "rounded"
        for d in sides:
            rgb = _resize(crop, d, d)[0].clamp(0, 1).numpy()
            a = alphas[(shape, d)]
            subj[d].append(np.concatenate([rgb * a, a[None]], 0))
    # "faces": the 200 lfw_subset patches (gray; the second 100 are scikit-image's non-face examples), tinted,
    # disc shaped
    ft = torch.from_numpy(faces)[:, None]
    for d in sides:
        g = _resize(ft, d, d).clamp(0, 1).numpy()  # (200, 1, d, d)
        tints = np.random.default_rng(BANK_SEED + 1).uniform(0.7, 1.0, size=(len(faces), 3, 1, 1))
        a = alphas[("disc", d)]
        rgba = np.concatenate([g * tints.astype(np.float32) * a, np.broadcast_to(a, g.shape)], 1)
        subj[d].extend(list(rgba))
    n = n_photo + len(faces)
    perm = np.random.default_rng(BANK_SEED + 2).permutation(n)
    subjects = {d: np.ascontiguousarray(np.stack(v)[perm], dtype=np.float32) for d, v in subj.items()}
    heldout = np.arange(0, n, HELDOUT_SUBJECT_EVERY)
    train = np.setdiff1d(np.arange(n), heldout)
    backgrounds = {(c, p): _background(c, p, s) for c in COLORS for p in PATTERNS}
    obj_sides = sorted({s // 4, 5 * s // 16, 3 * s // 8})
    object_alpha = {(sh, d): shape_alpha(sh, d) for sh in ("disc", "square", "diamond") for d in obj_sides}
    return Bank(s, textures, subjects, train, heldout, backgrounds, object_alpha)


def get_bank(image_size: int) -> Bank:
    """The (cached) content bank for ``image_size``; built on first use in well under a few seconds."""
    return _build(check_size(image_size))  # cached on the plain int: np.int64(32) finds the bank of 32


@functools.lru_cache(maxsize=65536)
def scaled_subject(image_size: int, index: int, src_side: int, dst_side: int) -> np.ndarray:
    """Subject ``index`` as shown at ``src_side`` pixels, resampled to ``dst_side`` (premultiplied RGBA).

    The target of a scaling task is defined as this fixed resampling of the *reference's* subject, so the
    right answer is a function of what the model sees (no hidden high-resolution detail).
    """
    src = get_bank(image_size).subjects[src_side][index]
    if src_side == dst_side:
        return src
    out = _resize(torch.from_numpy(src)[None], dst_side, dst_side)[0].clamp(0, 1).numpy()
    out[:3] = np.minimum(out[:3], out[3:4])  # keep premultiplied colour <= alpha
    return np.ascontiguousarray(out)
