"""The RefDiT parts of ``benchmarks/merging.py``: ToMe, adaptive threshold and CA-ToMe on trained RefDiTs.

Two models, each its own part of the JSON:

- ``refdit`` (the headline): ``refdit-sparse-64px`` -- 16x16 = 256 target tokens, reference K/V cache on (so
  every step runs only target and prompt tokens, the tokens merging acts on) -- plus the sweep stacked on
  Sparse Context (auto selection, 25 % of the reference tokens kept).
- ``refdit_small``: ``refdit-base`` at its 8x8 = 64 target tokens, where a merge saves less than it costs.

Quality: every held-out sample generated on its own (batch 1, as timed: an adaptive threshold merges the
batch's minimum count, so a batch would merge less than the timed runs do); PSNR to the same model's output
without merging and to the ground truth. Speed: whole 20-step generations of one held-out sample, every
setting timed interleaved after an untimed warm-up in it, median CPU time.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from common import interleaved, load, speedups

import tokensparse as ts
from tokensparse.data import heldout
from tokensparse.integrations.merging_hooks import apply_token_merging, merging_state, remove_token_merging
from tokensparse.merging import TokenMergingConfig
from tokensparse.metrics import psnr

SPEED = "cpu"  # which timing the speedups use: "cpu" (process time, one thread) or "wall"


@dataclass(frozen=True)
class Subject:
    """One RefDiT under test: which model, with the reference K/V cache or not, and the headline CA-ToMe."""

    model: str  # shipped name, checkpoint path or "untrained:<config>" (see common.load)
    cache: bool
    stack_keep: float | None = None  # also run the headline settings on Sparse Context at this keep


SUBJECTS = {
    "refdit": Subject("refdit-sparse-64px", cache=True, stack_keep=0.25),
    "refdit_small": Subject("refdit-base", cache=False),
}
# CA-ToMe's headline setting, fixed before the run: ToMe's usual budget (half the tokens) as the cap, an adaptive
# threshold below which no pair merges, matchings recomputed every 5 of the 20 steps
HEADLINE = "catome_t0.3_cap0.5_every5"
STACKED = ("dense", "tome_r0.5", HEADLINE)  # run again on Sparse Context

Setting = tuple[TokenMergingConfig | None, float]  # (merging, reference keep)


def settings(subject: Subject, quick: bool) -> dict[str, Setting]:
    """dense, ToMe ratios, ToMe + cache, adaptive thresholds, CA-ToMe (threshold + cache, uncapped and capped),
    then the stacked ones. Thresholds are centred cosines (``TokenMergingConfig.center``)."""
    out: dict[str, Setting] = {"dense": (None, 1.0)}
    for r in ((0.5,) if quick else (0.25, 0.5, 0.75)):
        out[f"tome_r{r}"] = (TokenMergingConfig(ratio=r), 1.0)
    out["tome_r0.5_cache5"] = (TokenMergingConfig(ratio=0.5, recompute_every=5), 1.0)
    if not quick:  # the raw cosine of ToMe / tomesd (and of tokensparse before 0.2)
        out["tome_r0.5_raw"] = (TokenMergingConfig(ratio=0.5, center=False), 1.0)
    for thr in (0.4,) if quick else (0.5, 0.4):
        out[f"adaptive_t{thr}"] = (TokenMergingConfig(threshold=thr), 1.0)
        out[f"catome_t{thr}_every5"] = (TokenMergingConfig(threshold=thr, recompute_every=5), 1.0)
    for cap in (0.5,) if quick else (0.5, 0.6):
        out[f"catome_t0.3_cap{cap}_every5"] = (TokenMergingConfig(threshold=0.3, ratio=cap, recompute_every=5), 1.0)
    if subject.stack_keep is not None:
        for k in STACKED:
            out[f"sparse{subject.stack_keep}+{k}"] = (out[k][0], subject.stack_keep)
    return out


def configure(model: ts.RefDiT, subject: Subject, setting: Setting) -> None:
    merging, keep = setting
    if keep < 1.0 or subject.cache:
        ts.apply_sparse_context(model, ts.SparseContextConfig(keep=keep, selector="auto", cache=subject.cache))
    else:
        ts.remove_sparse_context(model)
    if merging is None:
        remove_token_merging(model)
    else:
        apply_token_merging(model, merging)


def pooled_psnr(x: torch.Tensor, ref: torch.Tensor, peak: float = 1.0) -> float:
    """PSNR of the mean squared error over all images (or latents) at once; 99 dB where identical."""
    mse = float((x.double() - ref.double()).pow(2).mean())
    return 99.0 if mse == 0 else min(99.0, 10 * math.log10(peak**2 / mse))


def samples(model: ts.RefDiT, quick: bool) -> list:
    n = 2 if quick else 6  # per family; editing and subject tasks take one reference each
    return [s for fam in ("editing", "subject") for s in heldout(fam, n, model.config.image_size)]


def quality(subject: Subject, quick: bool, steps: int) -> dict:
    """PSNR to the unmerged output (same reference keep) and to ground truth, per setting."""
    model = load(subject.model)
    data = samples(model, quick)
    gt = torch.stack([s.target for s in data])
    outs: dict[str, torch.Tensor] = {}
    results: dict[str, dict] = {}
    for key, setting in settings(subject, quick).items():
        t0 = time.perf_counter()
        configure(model, subject, setting)
        imgs, merged = [], 0
        for i, s in enumerate(data):  # noise seed i, as sample i of one seed-0 batch
            imgs.append(ts.generate(model, list(s.refs), s.prompt, steps=steps, seed=i))
            st = merging_state(model)
            merged += st.merged_tokens if st is not None else 0
        outs[key] = out = torch.cat(imgs)
        base = outs["dense" if setting[1] == 1.0 else f"sparse{setting[1]}+dense"]  # same keep, no merging
        results[key] = {
            "merging": None if setting[0] is None else setting[0].__dict__, "keep": setting[1],
            "psnr_to_unmerged": pooled_psnr(out, base) if setting[0] is not None else None,
            "psnr_to_gt": float(psnr(out, gt).mean()),
            "merged_tokens_per_step_per_layer": merged / len(data) / steps / model.config.depth,
            # an earlier setting whose outputs are identical (e.g. a threshold whose cap binds everywhere)
            "same_outputs_as": next((k for k, o in outs.items() if k != key and torch.equal(o, out)), None),
        }
        print(f"  {subject.model} quality {key}: {results[key]['psnr_to_gt']:.2f} dB "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    remove_token_merging(model)
    ts.remove_sparse_context(model)
    for r in results.values():
        r["drop_db"] = results["dense"]["psnr_to_gt"] - r["psnr_to_gt"]
    return {"model": subject.model, "kv_cache": subject.cache, "steps": steps, "samples": len(data),
            "tasks": sorted({s.task for s in data}), "target_tokens": model.config.grid ** 2,
            "dense_psnr_to_gt": results["dense"]["psnr_to_gt"], "configs": results}


def speed(subject: Subject, quick: bool, steps: int) -> dict:
    """Whole ``steps``-step generations at batch 1 (one held-out sample, one reference), every setting."""
    model = load(subject.model)
    sample = samples(model, True)[0]
    cfgs = settings(subject, quick)

    def run(n_steps: int) -> None:
        ts.generate(model, list(sample.refs), sample.prompt, steps=n_steps, seed=0)

    def prepare(setting: Setting) -> Callable[[], None]:
        def fn() -> None:
            configure(model, subject, setting)
            run(2)
        return fn

    med = interleaved({k: (lambda: run(steps)) for k in cfgs}, repeats=3 if quick else 15, warmup=0,
                      prepare={k: prepare(c) for k, c in cfgs.items()})
    remove_token_merging(model)
    ts.remove_sparse_context(model)
    sp = speedups(med)
    return {"model": subject.model, "kv_cache": subject.cache, "steps": steps, "batch": 1, "references": 1,
            "seconds": med, "speedup": {k: v[SPEED] for k, v in sp.items()}, "speedup_wall_and_cpu": sp}


def at_equal_speed(points: list[tuple[float, float]], speed: float) -> tuple[float, bool]:
    """Linear interpolation of ``drop`` at ``speed`` along (speedup, drop) points; (value, extrapolated)."""
    pts = sorted(points)
    if speed <= pts[0][0]:
        return pts[0][1], speed < pts[0][0]
    for (s0, d0), (s1, d1) in itertools.pairwise(pts):
        if s0 <= speed <= s1:
            return (d0 + (d1 - d0) * (speed - s0) / (s1 - s0) if s1 > s0 else d1), False
    return pts[-1][1], True


def summarize(q: dict, sp: dict) -> dict[str, Any]:
    """The headline CA-ToMe setting (``HEADLINE``) against ToMe (ratios 0.25-0.75, no cache, centred) at equal
    speed, interpolated along ToMe's speed / drop curve (dense = (1, 0))."""
    c, speed_ = q["configs"], sp["speedup"]
    tome = [(1.0, 0.0)] + [(speed_[k], v["drop_db"]) for k, v in c.items()
                           if k.startswith("tome_r") and "cache" not in k and "raw" not in k and v["keep"] == 1.0]
    best = HEADLINE
    tome_drop, extrapolated = at_equal_speed(tome, speed_[best])
    s = {"catome_config": best, "catome_speedup": speed_[best], "catome_drop_db": c[best]["drop_db"],
         "tome_drop_db_at_equal_speed": tome_drop, "tome_equal_speed_extrapolated": extrapolated,
         "catome_psnr_to_unmerged": c[best]["psnr_to_unmerged"], "catome_same_outputs_as": c[best]["same_outputs_as"],
         "model": q["model"], "target_tokens": q["target_tokens"], "kv_cache": q["kv_cache"],
         # every CA-ToMe setting against ToMe at its speed (negative: CA-ToMe loses less)
         "catome_minus_tome_at_equal_speed_db": {
             k: c[k]["drop_db"] - at_equal_speed(tome, speed_[k])[0]
             for k in c if k.startswith("catome") and c[k]["keep"] == 1.0}}
    stacked = {k: (speed_[k], c[k]["drop_db"]) for k in c if c[k]["keep"] < 1.0 and k in speed_}
    if stacked:
        s["stacked"] = {k: {"speedup": v[0], "drop_db": v[1]} for k, v in stacked.items()}
    return s


if __name__ == "__main__":  # a module of merging.py: running it alone did nothing and exited 0
    raise SystemExit("merging_refdit.py holds the RefDiT parts of benchmarks/merging.py and runs nothing itself; "
                     "run: python benchmarks/merging.py [--quick] [--part refdit_quality,refdit_speed,...]")
