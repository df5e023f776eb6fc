"""Batches: the endless, resumable training stream, the fixed held-out sets, and the floors."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import checks
from .bank import check_size
from .tasks import (
    ALL_FAMILIES,
    HELDOUT_SEED_BASE,
    REFERENCE_TASKS,
    TASKS,
    Sample,
    make_arrays,
    make_sample,
)

MEAN_IMAGE_SEEDS = 256  # train-range seeds 0..255 of a task define its mean-image floor
_STREAM_SALT = 0x5EED


@dataclass
class Batch:
    """A batch of samples that all have the same number ``R`` of references.

    Attributes:
        refs: ``R`` tensors, each (B, 3, H, W) float32 in [0, 1]; ``refs[i][b]`` is reference i of sample b.
        prompts: B prompt strings (tokenize with ``tokensparse.vocab.tokenize``).
        target: (B, 3, H, W) float32 in [0, 1].
        tasks: B task names.
        seeds: B sample seeds (``make_sample(tasks[b], seeds[b], H, num_refs=R)`` regenerates sample b).
    """

    refs: list[torch.Tensor]
    prompts: list[str]
    target: torch.Tensor
    tasks: list[str]
    seeds: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return self.target.shape[0]

    @property
    def families(self) -> list[str]:
        """Family of each sample."""
        return [TASKS[t].family for t in self.tasks]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """A copy with image tensors moved to ``device`` (and cast to ``dtype`` if given)."""
        return Batch(
            [r.to(device, dtype) for r in self.refs],
            list(self.prompts),
            self.target.to(device, dtype),
            list(self.tasks),
            list(self.seeds),
        )


def _one_size(samples: Sequence[Sample], what: str) -> None:
    """``ValueError`` unless every image of ``samples`` (targets and references) has one shape: stacking them
    failed inside ``torch.stack`` with a ``RuntimeError``."""
    shape = tuple(samples[0].target.shape)
    for i, s in enumerate(samples):
        bad = next((tuple(x.shape) for x in (s.target, *s.refs) if tuple(x.shape) != shape), None)
        if bad is not None:
            raise ValueError(f"{what} needs samples of one image size, got {shape} (sample 0) and {bad} (sample {i})")


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack samples that share one reference count and one image size into a :class:`Batch` (``ValueError``
    otherwise)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    r = len(samples[0].refs)
    if any(len(s.refs) != r for s in samples):
        raise ValueError("all samples of a batch must have the same number of references; use batched()")
    _one_size(samples, "collate")
    return Batch(
        refs=[torch.stack([s.refs[i] for s in samples]) for i in range(r)],
        prompts=[s.prompt for s in samples],
        target=torch.stack([s.target for s in samples]),
        tasks=[s.task for s in samples],
        seeds=[s.seed for s in samples],
    )


def batched(samples: Sequence[Sample], batch_size: int) -> Iterator[tuple[list[int], Batch]]:
    """Split ``samples`` (e.g. a held-out set with mixed reference counts) into batches of equal ``R``.

    Yields ``(indices, batch)``; ``indices`` are positions in ``samples``, so per-sample results can be
    scattered back into the original order.
    """
    batch_size = checks.integer("batch_size", batch_size, lo=1)
    return _batched(samples, batch_size)


def _batched(samples: Sequence[Sample], batch_size: int) -> Iterator[tuple[list[int], Batch]]:
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(len(s.refs), []).append(i)
    for r in sorted(groups):
        idx = groups[r]
        for j in range(0, len(idx), batch_size):
            chunk = idx[j : j + batch_size]
            yield chunk, collate([samples[i] for i in chunk])


def _resolve_tasks(tasks: Sequence[str] | None) -> list[str]:
    names = list(REFERENCE_TASKS) if tasks is None else list(tasks)
    out: list[str] = []
    for n in names:  # family names expand to their tasks
        if n in ALL_FAMILIES:
            out += [t for t, spec in TASKS.items() if spec.family == n]
        elif n in TASKS:
            out.append(n)
        else:
            raise ValueError(f"unknown task or family {n!r}; tasks: {sorted(TASKS)}, families: {ALL_FAMILIES}")
    if not out:
        raise ValueError("no tasks selected")
    return list(dict.fromkeys(out))


def _family_probs(fams: Sequence[str], weights: Mapping[str, float]) -> np.ndarray:
    unknown = set(weights) - set(ALL_FAMILIES)
    if unknown:
        raise ValueError(f"family_weights names unknown families {sorted(unknown)}; families: {ALL_FAMILIES}")
    absent = sorted(f for f, v in weights.items() if f not in fams and float(v) > 0)
    if absent:  # their weight would be dropped silently: none of their batches can be drawn
        raise ValueError(f"family_weights weighs families {absent} that none of the selected tasks belong to "
                         f"(those are of {list(fams)}); add their tasks to tasks (the open family is trained only "
                         "when named) or leave them out of family_weights")
    w = np.array([float(weights.get(f, 1.0)) for f in fams])
    if not np.isfinite(w).all() or (w < 0).any() or w.max(initial=0.0) <= 0:
        raise ValueError(f"family_weights must be finite and >= 0 with a positive sum, got {dict(weights)}")
    if w.max() > 1e300:  # huge finite weights would overflow the sum: scale them first
        w = w / w.max()
    return w / w.sum()


def check_stream(tasks: Sequence[str] | None, family_weights: Mapping[str, float] | None) -> None:
    """Raise now (``TypeError`` / ``ValueError``) for ``tasks`` / ``family_weights`` that :func:`batch_plan`
    would reject at the first batch."""
    if tasks is not None and (isinstance(tasks, str) or not isinstance(tasks, Sequence)):
        raise TypeError(f"tasks must be a list of task or family names, or None; got {tasks!r}")
    names = _resolve_tasks(tasks)
    if family_weights is not None:
        if not isinstance(family_weights, Mapping):
            raise TypeError(f"family_weights must map family names to weights, got {type(family_weights).__name__}")
        for f, w in family_weights.items():
            checks.real(f"family_weights[{f!r}]", w, 0.0)
        if family_weights:
            _family_probs([f for f in ALL_FAMILIES if any(TASKS[t].family == f for t in names)], family_weights)


def batch_plan(
    k: int, batch_size: int, seed: int = 0, tasks: Sequence[str] | None = None,
    family_weights: Mapping[str, float] | None = None,
) -> tuple[str, int, list[int]]:
    """The task, reference count and sample seeds of training batch ``k``: a pure function of its arguments.

    Each batch holds one task. A family is drawn first (equal shares, or in proportion to ``family_weights``;
    families it does not name weigh 1, and a positive weight for a family none of ``tasks`` belongs to is a
    ``ValueError``), then a task uniformly within it, and the reference count uniformly
    from the task's range. Sample seeds are drawn from the training range ``[0, HELDOUT_SEED_BASE)``.
    """
    k, batch_size = checks.integer("k", k, lo=0), checks.integer("batch_size", batch_size, lo=1)
    seed = checks.seed("seed", seed)
    names = _resolve_tasks(tasks)
    fams = [f for f in ALL_FAMILIES if any(TASKS[t].family == f for t in names)]
    rng = np.random.default_rng([int(seed), int(k), _STREAM_SALT])
    # no weights (None or {}) keep the original draw, so existing streams are unchanged
    if family_weights:
        pick = rng.choice(len(fams), p=_family_probs(fams, family_weights))
    else:
        pick = rng.integers(len(fams))
    fam = fams[int(pick)]
    in_fam = [t for t in names if TASKS[t].family == fam]
    task = in_fam[int(rng.integers(len(in_fam)))]
    lo, hi = TASKS[task].num_refs
    r = int(rng.integers(lo, hi + 1))
    seeds = rng.integers(0, HELDOUT_SEED_BASE, size=batch_size).tolist()
    return task, r, seeds


def make_batch(task: str, seeds: Sequence[int], image_size: int = 32, num_refs: int | None = None) -> Batch:
    """Build a batch of one task from explicit seeds (all with ``num_refs`` references; default: the
    task's minimum, so that a batch is always well formed)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {sorted(TASKS)}")
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise TypeError(f"seeds must be a sequence of ints, got {type(seeds).__name__}")
    if len(seeds) == 0:
        raise ValueError("make_batch needs at least one seed")
    seeds = [checks.seed(f"seeds[{i}]", s) for i, s in enumerate(seeds)]
    r = TASKS[task].num_refs[0] if num_refs is None else num_refs
    refs_np, prompts, targets = [], [], []
    for s in seeds:
        refs, prompt, target = make_arrays(task, int(s), image_size, r)
        refs_np.append(refs)
        prompts.append(prompt)
        targets.append(target)
    return Batch(
        refs=[torch.from_numpy(np.stack([x[i] for x in refs_np])) for i in range(r)],
        prompts=prompts,
        target=torch.from_numpy(np.stack(targets)),
        tasks=[task] * len(seeds),
        seeds=[int(s) for s in seeds],
    )


def train_batches(
    batch_size: int,
    image_size: int = 32,
    seed: int = 0,
    tasks: list[str] | None = None,
    start: int = 0,
    stride: int = 1,
    family_weights: Mapping[str, float] | None = None,
) -> Iterator[Batch]:
    """Endless training stream. Batch ``k`` is a pure function of ``(seed, k)`` (see :func:`batch_plan`).

    Args:
        batch_size: samples per batch (all of one task and one reference count).
        image_size: image side, a multiple of 8 in [16, 256].
        seed: stream seed; different seeds give different streams.
        tasks: task and/or family names to draw from (default: all tasks).
        start: index of the first batch, to resume a run: ``train_batches(..., start=k)`` yields exactly what
            the uninterrupted stream yields from its k-th batch on.
        stride: yield batches ``start, start + stride, ...`` without building the skipped ones. For data
            parallelism, rank ``i`` of ``n`` resuming at step ``s`` uses ``start=s * n + i, stride=n``.
        family_weights: relative share of batches per family (see :func:`batch_plan`); default equal.
    """
    batch_size = checks.integer("batch_size", batch_size, lo=1)  # all checked now, not at the first next()
    start, stride = checks.integer("start", start, lo=0), checks.integer("stride", stride, lo=1)
    seed = checks.seed("seed", seed)
    check_stream(tasks, family_weights)
    image_size = check_size(image_size)
    return _stream(batch_size, image_size, seed, _resolve_tasks(tasks), start, stride, family_weights)


def _stream(batch_size: int, image_size: int, seed: int, names: list[str], start: int, stride: int,
            family_weights: Mapping[str, float] | None) -> Iterator[Batch]:
    k = start
    while True:
        task, r, seeds = batch_plan(k, batch_size, seed, names, family_weights)
        yield make_batch(task, seeds, image_size, r)
        k += stride


def _heldout_names(family_or_task: str) -> list[str]:
    if family_or_task in ALL_FAMILIES:
        return [t for t, spec in TASKS.items() if spec.family == family_or_task]
    if family_or_task in TASKS:
        return [family_or_task]
    raise ValueError(
        f"unknown family or task {family_or_task!r}; families: {ALL_FAMILIES}, tasks: {sorted(TASKS)}"
    )


def heldout_plan(family_or_task: str, n: int = 512) -> list[tuple[str, int]]:
    """``(task, seed)`` of each held-out sample: tasks round-robin, the j-th sample of a task has seed
    ``HELDOUT_SEED_BASE + j``. So ``heldout("place")[j]`` equals ``heldout("subject")[2 * j]``."""
    names = _heldout_names(family_or_task)
    n = checks.integer("n", n, lo=0)
    return [(names[i % len(names)], HELDOUT_SEED_BASE + i // len(names)) for i in range(n)]


def heldout(family_or_task: str, n: int = 512, image_size: int = 32) -> list[Sample]:
    """The fixed held-out set of a family (balanced over its tasks) or of one task.

    Seeds are ``>= HELDOUT_SEED_BASE`` (never used by :func:`train_batches`), subjects come from the held-out
    part of the subject bank, and reference counts vary within a task's range (group with :func:`batched`).
    """
    n = checks.integer("n", n, lo=0)
    return [make_sample(t, s, image_size) for t, s in heldout_plan(family_or_task, n)]


def mean_image(task: str, image_size: int = 32) -> torch.Tensor:
    """Mean target (3, S, S) of ``task`` over the fixed train-range seeds ``0..MEAN_IMAGE_SEEDS-1``: a new tensor
    each call (computed once per task and size), so editing it in place leaves later calls and :func:`floors`
    alone."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {sorted(TASKS)}")
    return torch.from_numpy(_mean_image(task, check_size(image_size)).copy())


@functools.lru_cache(maxsize=64)
def _mean_image(task: str, image_size: int) -> np.ndarray:
    acc = np.zeros((3, image_size, image_size), np.float64)
    for s in range(MEAN_IMAGE_SEEDS):
        acc += make_arrays(task, s, image_size)[2]
    return (acc / MEAN_IMAGE_SEEDS).astype(np.float32)


def floors(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Trivial per-sample predictions to report next to every model number (samples of one image size).

    Returns ``{"copy_ref": (N,3,H,W) the first reference, "mean_image": (N,3,H,W) the mean target of the
    sample's task}``. Score them with :mod:`tokensparse.metrics` exactly like model outputs.
    """
    if not samples:
        raise ValueError("floors needs at least one sample")
    if any(not s.refs for s in samples):
        raise ValueError("floors needs samples with references (the copy-reference floor); "
                         f"{next(s.task for s in samples if not s.refs)!r} samples have none")
    _one_size(samples, "floors")
    size = samples[0].target.shape[-1]
    return {
        "copy_ref": torch.stack([s.refs[0] for s in samples]),
        "mean_image": torch.stack([mean_image(s.task, size) for s in samples]),
    }
