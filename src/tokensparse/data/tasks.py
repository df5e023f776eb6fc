"""The procedural tasks: each sample is a pure function of (task, seed, image_size) with one exact answer.

Families and tasks (S = image size; sizes small/medium/large = S/4, 3S/8, S/2; 3x3 named cells):

* ``editing`` (target pixel-aligned with the single reference, a crop of a real photo):
  ``recolor`` "recolor the red object blue" — 1-3 translucent (alpha 0.6) coloured shapes lie on the photo;
  the named one changes colour. ``remove`` "remove the red object" — the named translucent shape disappears;
  it was translucent, so the photo under it is exactly recoverable from the reference. ``relight`` "relight
  warm" — a fixed per-channel gain (bright, dark, warm, cool), clipped to [0, 1].
* ``subject`` (one reference: a subject cut from a photo or an lfw face, on a plain random colour, at a random
  position, small or medium): ``place`` "place subject top left large on blue stripes" — the subject, resampled from
  its reference size to the named size, at the named cell on the named background. ``backdrop`` "background
  green dots" — same subject, same position and size, new named background.
* ``open`` (no reference; not in ``FAMILIES``, trained only when named): ``scene`` "scene red object on blue
  dots" — one opaque shape (disc, square or diamond, side S/4, 5S/16 or 3S/8, anywhere) of the named colour on
  the named background: many right answers, for guidance and FID. (Known skew, kept so that the shipped
  ``refdit-routed`` and FeatureNet match their data: on backgrounds that are not object colours, magenta is
  never drawn as the shape colour.)
* ``multi`` (2-4 references): ``compose`` "compose first top left second bottom right on red plain" — each
  reference's subject (kept at its reference size) at the named cell, later ones drawn over earlier ones.
  ``compose_scene`` "compose second top left third center right on first" — the first reference is a photo
  scene (copied pixel-aligned); the subjects of the other references are placed on it.

Every subject reference shows its subject small or medium (side S/4 or 3S/8) on a plain colour, so with S/8
patches the subject covers at most 25 % of the reference's tokens (4-16 of 64 at 32 px): the references are
redundant, and a foreground-aware selection at keep 0.25 can hold all of the subject. Targets use all three
sizes (``place`` resamples the reference's subject up or down).

Samples with seed ``>= HELDOUT_SEED_BASE`` draw subjects from the held-out part of the subject bank, so
held-out samples show subject crops never used in training. They are cut from the same photos, though, and
some near-flat crops (sky) look almost alike across the split. Editing tasks have no subjects: their space is
small (``relight``: a texture crop, a flip and a gain word), so some held-out ``relight`` samples also occur
in training, byte for byte. Texture crops are resized with antialiasing and not clamped, so at 32 px and above
pixel values may exceed 1 by float rounding (a few 1e-7).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .. import checks
from .bank import (
    COLORS,
    COLS,
    OBJECT_COLORS,
    PATTERNS,
    REF_SIZES,
    ROWS,
    SIZES,
    Bank,
    cell_xy,
    get_bank,
    scaled_subject,
    size_px,
)

HELDOUT_SEED_BASE = 10**9  # train seeds are in [0, 10**9); held-out seeds are >= 10**9
OBJECT_ALPHA = 0.6
ORDINALS = ("first", "second", "third", "fourth")
RELIGHT_GAINS: dict[str, tuple[float, float, float]] = {
    "bright": (1.5, 1.5, 1.5),
    "dark": (0.55, 0.55, 0.55),
    "warm": (1.3, 1.0, 0.7),
    "cool": (0.7, 1.0, 1.3),
}
_SCENE_COLORS = tuple(COLORS)  # every named colour can be a target background

Array = np.ndarray


@dataclass
class Sample:
    """One example: references, prompt and the exact target.

    Attributes:
        refs: reference images, each a float32 tensor (3, H, W) in [0, 1].
        prompt: space-separated vocabulary words (``tokensparse.vocab.tokenize`` accepts it).
        target: float32 tensor (3, H, W) in [0, 1], the one right answer.
        task, family: task name and its family.
        seed: the seed that regenerates this sample bit-exactly with :func:`make_sample`.
    """

    refs: list[torch.Tensor]
    prompt: str
    target: torch.Tensor
    task: str
    family: str
    seed: int


@dataclass(frozen=True)
class TaskSpec:
    """A task: its family, the inclusive range ``num_refs = (lo, hi)`` of reference counts, and a generator."""

    name: str
    family: str
    num_refs: tuple[int, int]
    description: str
    generate: Callable[[np.random.Generator, Bank, Array, int], tuple[list[Array], str, Array]]


# ---------------------------------------------------------------- helpers (numpy, (3, S, S) float32)


def _texture_crop(rng: np.random.Generator, bank: Bank) -> Array:
    tex = bank.textures[int(rng.integers(len(bank.textures)))]
    s = bank.image_size
    y = int(rng.integers(tex.shape[1] - s + 1))
    x = int(rng.integers(tex.shape[2] - s + 1))
    crop = tex[:, y : y + s, x : x + s]
    return (crop[:, :, ::-1] if rng.random() < 0.5 else crop).copy()  # a copy: never alias the bank


def _paste(img: Array, rgba: Array, y: int, x: int) -> None:
    """Composite premultiplied ``rgba`` (4, d, d) over ``img`` at (y, x), in place."""
    d = rgba.shape[-1]
    win = img[:, y : y + d, x : x + d]
    win *= 1.0 - rgba[3:4]
    win += rgba[:3]


def _objects(rng: np.random.Generator, bank: Bank, k: int) -> list[tuple[str, Array]]:
    """``k`` translucent shapes in distinct quadrants: (colour name, full-size alpha (S, S))."""
    s = bank.image_size
    sides = sorted({d for (_, d) in bank.object_alpha})
    shapes = sorted({sh for (sh, _) in bank.object_alpha})
    quads = rng.permutation(4)[:k]
    colors = rng.permutation(len(OBJECT_COLORS))[:k]
    out = []
    for q, c in zip(quads, colors):
        d = sides[int(rng.integers(len(sides)))]
        alpha = bank.object_alpha[(shapes[int(rng.integers(len(shapes)))], d)]
        y = (q // 2) * (s // 2) + int(rng.integers(s // 2 - d + 1))
        x = (q % 2) * (s // 2) + int(rng.integers(s // 2 - d + 1))
        m = np.zeros((s, s), np.float32)
        m[y : y + d, x : x + d] = alpha * OBJECT_ALPHA
        out.append((OBJECT_COLORS[c], m))
    return out


def _tint(img: Array, color: str, m: Array) -> Array:
    c = np.asarray(COLORS[color], np.float32)[:, None, None]
    return img * (1.0 - m) + c * m


def _subject_ref(rng: np.random.Generator, bank: Bank, idx: int, side: int) -> tuple[Array, int, int]:
    """A reference: subject ``idx`` at ``side`` px, random position, on a random plain colour."""
    s = bank.image_size
    bg = rng.uniform(0.05, 0.95, size=3).astype(np.float32)
    ref = np.empty((3, s, s), np.float32)
    ref[:] = bg[:, None, None]
    y, x = int(rng.integers(s - side + 1)), int(rng.integers(s - side + 1))
    _paste(ref, bank.subjects[side][idx], y, x)
    return ref, y, x


def _scene_words(rng: np.random.Generator) -> tuple[str, str]:
    return _SCENE_COLORS[int(rng.integers(len(_SCENE_COLORS)))], PATTERNS[int(rng.integers(len(PATTERNS)))]


# ---------------------------------------------------------------- task generators


def _recolor(rng, bank, pool, num_refs):
    objs = _objects(rng, bank, int(rng.integers(1, 4)))
    ref = _texture_crop(rng, bank)
    for color, m in objs:
        ref = _tint(ref, color, m)
    j = int(rng.integers(len(objs)))
    used = {c for c, _ in objs}
    free = [c for c in OBJECT_COLORS if c not in used]
    new = free[int(rng.integers(len(free)))]
    old, m = objs[j]
    delta = (np.asarray(COLORS[new], np.float32) - np.asarray(COLORS[old], np.float32))[:, None, None]
    return [ref], f"recolor the {old} object {new}", ref + m * delta


def _remove(rng, bank, pool, num_refs):
    objs = _objects(rng, bank, int(rng.integers(1, 4)))
    base = _texture_crop(rng, bank)
    j = int(rng.integers(len(objs)))
    ref, target = base, base
    for i, (color, m) in enumerate(objs):
        ref = _tint(ref, color, m)
        if i != j:
            target = _tint(target, color, m)
    return [ref], f"remove the {objs[j][0]} object", target


def _relight(rng, bank, pool, num_refs):
    ref = _texture_crop(rng, bank)
    word = tuple(RELIGHT_GAINS)[int(rng.integers(len(RELIGHT_GAINS)))]
    gain = np.asarray(RELIGHT_GAINS[word], np.float32)[:, None, None]
    return [ref], f"relight {word}", np.clip(ref * gain, 0.0, 1.0)


def _place(rng, bank, pool, num_refs):
    s = bank.image_size
    idx = int(pool[int(rng.integers(len(pool)))])
    src = size_px(REF_SIZES[int(rng.integers(2))], s)  # references show small or medium subjects
    ref, _, _ = _subject_ref(rng, bank, idx, src)
    size, row, col = SIZES[int(rng.integers(3))], ROWS[int(rng.integers(3))], COLS[int(rng.integers(3))]
    color, pattern = _scene_words(rng)
    dst = size_px(size, s)
    target = bank.backgrounds[(color, pattern)].copy()
    _paste(target, scaled_subject(s, idx, src, dst), *cell_xy(row, col, dst, s))
    return [ref], f"place subject {row} {col} {size} on {color} {pattern}", target


def _backdrop(rng, bank, pool, num_refs):
    s = bank.image_size
    idx = int(pool[int(rng.integers(len(pool)))])
    side = size_px(REF_SIZES[int(rng.integers(2))], s)  # small or medium, as in every subject reference
    ref, y, x = _subject_ref(rng, bank, idx, side)
    color, pattern = _scene_words(rng)
    target = bank.backgrounds[(color, pattern)].copy()
    _paste(target, bank.subjects[side][idx], y, x)
    return [ref], f"background {color} {pattern}", target


def _compose_onto(rng, bank, pool, target, n_subjects, first_ordinal):
    """Place ``n_subjects`` fresh subject references onto ``target``; return (refs, prompt clauses)."""
    s = bank.image_size
    idxs = rng.choice(pool, size=n_subjects, replace=False)
    cells = rng.permutation(9)[:n_subjects]
    refs, words = [], []
    for i, (idx, cell) in enumerate(zip(idxs, cells)):
        side = size_px(REF_SIZES[int(rng.integers(2))], s)  # small or medium
        ref, _, _ = _subject_ref(rng, bank, int(idx), side)
        row, col = ROWS[cell // 3], COLS[cell % 3]
        _paste(target, bank.subjects[side][int(idx)], *cell_xy(row, col, side, s))
        refs.append(ref)
        words.append(f"{ORDINALS[first_ordinal + i]} {row} {col}")
    return refs, " ".join(words)


def _compose(rng, bank, pool, num_refs):
    color, pattern = _scene_words(rng)
    target = bank.backgrounds[(color, pattern)].copy()
    refs, clauses = _compose_onto(rng, bank, pool, target, num_refs, 0)
    return refs, f"compose {clauses} on {color} {pattern}", target


def _compose_scene(rng, bank, pool, num_refs):
    scene = _texture_crop(rng, bank)
    target = scene.copy()
    refs, clauses = _compose_onto(rng, bank, pool, target, num_refs - 1, 1)
    return [scene, *refs], f"compose {clauses} on first", target


def _scene(rng, bank, pool, num_refs):
    """Prompt only, many right answers: one opaque shape of the named colour, its shape, size and place free."""
    color, pattern = _scene_words(rng)
    obj = [c for c in OBJECT_COLORS if c != color][int(rng.integers(len(OBJECT_COLORS) - 1))]
    target = bank.backgrounds[(color, pattern)].copy()
    keys = sorted(bank.object_alpha)
    alpha = bank.object_alpha[keys[int(rng.integers(len(keys)))]]
    d, s = alpha.shape[-1], bank.image_size
    y, x = int(rng.integers(s - d + 1)), int(rng.integers(s - d + 1))
    win = target[:, y : y + d, x : x + d]
    win[:] = _tint(win, obj, alpha)
    return [], f"scene {obj} object on {color} {pattern}", target


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "recolor", "editing", (1, 1), "a named translucent shape on a photo changes colour", _recolor
        ),
        TaskSpec("remove", "editing", (1, 1), "a named translucent shape on a photo is removed", _remove),
        TaskSpec("relight", "editing", (1, 1), "a photo gets a named global colour gain", _relight),
        TaskSpec(
            "place",
            "subject",
            (1, 1),
            "subject rescaled to a named size at a named cell on a named background",
            _place,
        ),
        TaskSpec("backdrop", "subject", (1, 1), "subject kept in place, background replaced", _backdrop),
        TaskSpec("compose", "multi", (2, 4), "2-4 subjects at named cells on a named background", _compose),
        TaskSpec(
            "compose_scene",
            "multi",
            (2, 4),
            "1-3 subjects at named cells on the first reference's photo",
            _compose_scene,
        ),
        TaskSpec("scene", "open", (0, 0), "prompt only: a named-colour shape anywhere on a named background", _scene),
    )
}
FAMILIES: tuple[str, ...] = ("editing", "subject", "multi")  # the reference-conditioned families
# families with many right answers (for guidance and FID); trained only when a recipe names them
OPEN_FAMILIES: tuple[str, ...] = ("open",)
ALL_FAMILIES: tuple[str, ...] = FAMILIES + OPEN_FAMILIES
REFERENCE_TASKS: tuple[str, ...] = tuple(t for t, spec in TASKS.items() if spec.family in FAMILIES)


def _check_task(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    return TASKS[task]


def make_arrays(task: str, seed: int, image_size: int = 32, num_refs: int | None = None
                ) -> tuple[list[np.ndarray], str, np.ndarray]:
    """Like :func:`make_sample` but returns ``(refs, prompt, target)`` as numpy float32 (3, S, S) arrays."""
    spec = _check_task(task)
    seed = checks.seed("seed", seed)
    if isinstance(image_size, np.integer):
        image_size = int(image_size)
    if num_refs is not None:
        num_refs = checks.integer("num_refs", num_refs)
    bank = get_bank(image_size)
    rng = np.random.default_rng([int(seed), zlib.crc32(task.encode())])
    lo, hi = spec.num_refs
    drawn = int(
        rng.integers(lo, hi + 1)
    )  # always drawn, so fixing num_refs leaves the rest of the stream alone
    r = drawn if num_refs is None else int(num_refs)
    if not lo <= r <= hi:
        raise ValueError(f"task {task!r} takes {lo}..{hi} references, got num_refs={r}")
    pool = bank.heldout_subjects if seed >= HELDOUT_SEED_BASE else bank.train_subjects
    refs, prompt, target = spec.generate(rng, bank, pool, r)
    return refs, prompt, target


def make_sample(task: str, seed: int, image_size: int = 32, num_refs: int | None = None) -> Sample:
    """Generate sample ``seed`` of ``task`` at ``image_size`` (multiple of 8, 16..256). Deterministic.

    ``num_refs`` fixes the reference count within ``TASKS[task].num_refs``; by default it is drawn from the seed.
    """
    refs, prompt, target = make_arrays(task, seed, image_size, num_refs)
    return Sample(
        refs=[torch.from_numpy(np.ascontiguousarray(r, np.float32)) for r in refs],
        prompt=prompt,
        target=torch.from_numpy(np.ascontiguousarray(target, np.float32)),
        task=task,
        family=TASKS[task].family,
        seed=int(seed),
    )
