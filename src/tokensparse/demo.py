"""``tokensparse demo``: dense vs sparse generation on held-out tasks, a table and a PNG."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from .api import apply_sparse_context, remove_sparse_context
from .context import SparseContextConfig
from .flow import check_steps
from .generate import generate
from .images import check_png_path, save_png
from .models import RefDiT, build_model, list_models, load_model
from .models.zoo import randomize_zero_init


def demo_model(console: Console) -> tuple[RefDiT, bool]:
    """The shipped sparse checkpoint if this build has it, else an untrained model (and say so)."""
    for name in ("refdit-sparse", "refdit-base"):
        if list_models()[name]["weights"]:
            return load_model(name), True
    console.print("[yellow]No trained checkpoint ships in this build yet: running an UNTRAINED refdit-s "
                  "end to end (outputs are noise; timings and token counts are real).[/yellow]")
    torch.manual_seed(0)
    return randomize_zero_init(build_model("refdit-s").eval()), False


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _panel(s, masks: list[torch.Tensor], dense: torch.Tensor, sparse: torch.Tensor, cell: int = 128
           ) -> Image.Image:
    """One row: each reference with its kept tokens (``masks``) outlined, dropped ones dimmed | dense | sparse |
    truth."""
    from .images import to_pil
    from .show_selection import draw_selection

    refs = [r.unsqueeze(0) for r in s.refs]
    tiles = [draw_selection(ref, mask, scale=cell) for ref, mask in zip(refs, masks)]
    tiles += [to_pil(img).resize((cell, cell), Image.NEAREST) for img in (dense[0], sparse[0], s.target)]
    labels = [f"ref {i + 1}" for i in range(len(refs))] + ["dense", "sparse", "truth"]
    row = Image.new("RGB", (cell * len(tiles), cell + 14), (255, 255, 255))
    draw = ImageDraw.Draw(row)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        row.paste(tile, (i * cell, 14))
        draw.text((i * cell + 4, 1), label, fill=(0, 0, 0))
    return row


def run_demo(out: Path, steps: int = 20, console: Console | None = None, keep: float = 0.25,
             repeats: int = 3) -> dict:
    """Generate one multi- and one single-reference held-out example dense and sparse; write ``out``.

    Seconds are the median wall time of ``repeats`` interleaved runs of each, after a short warm-up.

    Sparse = task-aware (``auto``) selection at an average budget of ``keep``, plus the reference K/V cache
    when the model supports it (``ref_attends_target=False``, as the shipped ``refdit-sparse``). Target-token
    merging and guidance are left off: at RefDiT's 64 target tokens merging costs more than it saves
    (``benchmarks/results/merging.json``), and the held-out tasks have one right answer each.
    """
    from . import checks
    from .data import heldout
    from .metrics import psnr

    repeats = checks.integer("repeats", repeats, lo=1)  # the median of no runs: a StatisticsError at the end
    steps = check_steps(steps)  # generate checks it too, but only after the model loads and the warm-up runs
    check_png_path(out)  # save_png would refuse it, after all the generation
    console = console or Console()
    model, trained = demo_model(console)
    size = model.config.image_size
    cache = not model.config.ref_attends_target
    examples = [heldout("multi", 1, size)[0], heldout("subject", 1, size)[0]]
    cfg = SparseContextConfig(keep=keep, selector="auto", cache=cache)
    label = f"auto {keep}" + (" + K/V cache" if cache else "")
    table = Table(title=f"tokensparse demo ({'trained' if trained else 'UNTRAINED'} model, {steps} steps)")
    for col in ("task", "refs", "mode", "ref tokens", "seconds", "speedup", "PSNR vs truth"):
        table.add_column(col)
    rows, panels = [], []
    for s in examples:
        n_tokens = len(s.refs) * model.config.grid ** 2
        kept_seqs: list = []  # registered after Sparse Context's hook, so it sees the kept tokens
        times: dict[str, list[float]] = {"dense": [], "sparse": []}
        images: dict[str, torch.Tensor] = {}
        for r in range(-1, repeats):  # dense and sparse interleaved, median of `repeats`; r = -1 warms up
            n_steps = 2 if r < 0 else steps
            for mode in ("dense", "sparse"):
                probe = None
                if mode == "sparse":
                    apply_sparse_context(model, cfg)
                    probe = model.ref_embedder.register_forward_hook(
                        lambda m, a, out, kept=kept_seqs: kept.append(out))
                images[mode], secs = _timed(lambda s=s, n=n_steps: generate(model, s.refs, s.prompt, steps=n))
                if probe is not None:
                    probe.remove()
                    remove_sparse_context(model)
                if r >= 0:
                    times[mode].append(secs)
        dense, sparse = images["dense"], images["sparse"]  # the same images every repeat (seeded)
        t_dense, t_sparse = statistics.median(times["dense"]), statistics.median(times["sparse"])
        kept = int(kept_seqs[-1].counts()[0])
        target = s.target.unsqueeze(0)
        for mode, img, secs, toks in (("dense", dense, t_dense, n_tokens), (label, sparse, t_sparse, kept)):
            p = float(psnr(img, target)[0])
            table.add_row(s.task, str(len(s.refs)), mode, str(toks), f"{secs:.2f}", f"{t_dense / secs:.2f}x",
                          f"{p:.2f}")
            rows.append({"task": s.task, "mode": mode, "seconds": secs, "tokens": toks, "psnr": p})
        panels.append(_panel(s, kept_seqs[-1].kept_grids(0), dense, sparse))  # what generation kept
    console.print(table)
    grid = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), (255, 255, 255))
    for i, p in enumerate(panels):
        grid.paste(p, (0, sum(q.height for q in panels[:i])))
    save_png(grid, out)
    console.print(f"wrote {out}: each row = references (dropped tokens dimmed) | dense | sparse | ground truth")
    return {"trained": trained, "cache": cache, "rows": rows}
