"""Procedural task suite with exact ground truth (see :mod:`tokensparse.data.tasks` for the task list).

Quick use::

    from tokensparse.data import train_batches, heldout, floors
    batch = next(train_batches(16, image_size=32))      # Batch: refs [R x (B,3,H,W)], prompts, target
    val = heldout("subject", n=512)                       # list[Sample], seeds >= 10**9
    fl = floors(val)                                      # {"copy_ref": ..., "mean_image": ...}
"""

from .bank import COLORS, PATTERNS, get_bank
from .grid import save_task_grid
from .stream import (
    Batch,
    batch_plan,
    batched,
    collate,
    floors,
    heldout,
    heldout_plan,
    make_batch,
    mean_image,
    train_batches,
)
from .tasks import (
    ALL_FAMILIES,
    FAMILIES,
    HELDOUT_SEED_BASE,
    OPEN_FAMILIES,
    REFERENCE_TASKS,
    TASKS,
    Sample,
    TaskSpec,
    make_sample,
)

__all__ = [
    "ALL_FAMILIES",
    "COLORS",
    "FAMILIES",
    "HELDOUT_SEED_BASE",
    "OPEN_FAMILIES",
    "PATTERNS",
    "REFERENCE_TASKS",
    "TASKS",
    "Batch",
    "Sample",
    "TaskSpec",
    "batch_plan",
    "batched",
    "collate",
    "floors",
    "get_bank",
    "heldout",
    "heldout_plan",
    "make_batch",
    "make_sample",
    "mean_image",
    "save_task_grid",
    "train_batches",
]
