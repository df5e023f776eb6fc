"""A PNG grid of task samples: one row per sample, columns = references | prompt | target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .. import checks
from ..images import save_png
from .bank import check_size
from .tasks import TASKS, make_sample


def _to_pil(img, scale: int) -> Image.Image:
    arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)


MAX_HEIGHT = 65535
"""Tallest task grid drawn: image viewers (and many libraries) refuse taller images."""


def save_task_grid(
    path: str | Path, image_size: int = 32, per_task: int = 4, scale: int | None = None, seed: int = 0
) -> None:
    """Write a PNG: ``per_task`` rows per task (seeds ``seed..seed+per_task-1``), columns = up to four
    references, the task name and prompt, and the target. Images are upscaled (nearest) to ~96 px, or by the
    integer ``scale`` (>= 1) when given.

    ``ValueError`` for a grid taller than :data:`MAX_HEIGHT` pixels (PNG viewers' limit), before drawing it."""
    per_task = checks.integer("per_task", per_task, lo=1)
    image_size = check_size(image_size)  # what make_sample takes: the one message for every size it refuses
    scale = max(1, 96 // image_size) if scale is None else checks.integer("scale", scale, lo=1)
    cell = image_size * scale
    pad, text_w = 4, 300
    fits = (MAX_HEIGHT - pad) // ((cell + pad) * len(TASKS))
    if per_task > fits:
        raise ValueError(f"per_task={per_task} draws a grid over {MAX_HEIGHT} pixels tall; at most {fits} per task "
                         f"at image_size={image_size}")
    max_refs = max(spec.num_refs[1] for spec in TASKS.values())
    rows = [make_sample(t, seed + i, image_size) for t in TASKS for i in range(per_task)]
    width = pad + max_refs * (cell + pad) + text_w + cell + pad
    height = pad + len(rows) * (cell + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, s in enumerate(rows):
        y = pad + r * (cell + pad)
        for i, ref in enumerate(s.refs):
            canvas.paste(_to_pil(ref, scale), (pad + i * (cell + pad), y))
        tx = pad + max_refs * (cell + pad)
        words, lines, cur = s.prompt.split(), [], ""
        for w in words:  # wrap the prompt at ~40 characters
            if len(cur) + len(w) + 1 > 40:
                lines.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}".strip()
        lines.append(cur)
        draw.text((tx + 4, y + 4), f"{s.task} ({s.family})  ->", fill=(120, 0, 0), font=font)
        for j, line in enumerate(lines):
            draw.text((tx + 4, y + 20 + 13 * j), line, fill=(0, 0, 0), font=font)
        canvas.paste(_to_pil(s.target, scale), (tx + text_w, y))
    save_png(canvas, path)  # atomic; nothing half-written on failure
