"""Token merging (ToMe, adaptive threshold, CA-ToMe cache): speed and quality on RefDiT and an SD-style UNet.

    python benchmarks/merging.py [--quick] [--part PARTS] [--out benchmarks/results/merging.json]

RefDiT (``merging_refdit.py``): 20-step generations of held-out task samples with the shipped
``refdit-sparse-64px`` (16x16 target tokens, reference K/V cache on; the sweep also stacked on Sparse Context
at 25 % of the reference tokens) and ``refdit-base`` (8x8 target tokens); quality = PSNR to the unmerged output
and to the ground truth (each sample generated alone, batch 1, as timed); speed = median CPU time of the whole
generation over interleaved repeats, each right after an untimed warm-up generation in its setting (UNet too).
A third RefDiT timing runs a random-weight ``refdit-s-128px`` (32x32 = 1,024 target tokens).

UNet: an SD-style ``UNet2DConditionModel`` built from a config (64x64 latents = 4,096 tokens at its top level,
batch 2 as with classifier-free guidance), driven by a DDIM loop; our hooks side by side with the ``tomesd``
package (benchmark-only dependency) at ratio 0.5 with tomesd's defaults (self-attention only, top level); ours
with its default centred cosine and, like for like, with tomesd's raw cosine (``ours_r0.5_raw``).
Quality = PSNR of the final latent to the dense one (peak = the dense latent's range).

Every speedup is a ratio of medians taken within this run on this machine. Writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import merging_refdit as mr
import torch
from common import interleaved, parser, progress, pyplot, speedups, write_json

import tokensparse as ts
from tokensparse.integrations.merging_hooks import apply_token_merging, remove_token_merging
from tokensparse.merging import TokenMergingConfig

# ---------------------------------------------------------------------------------------------- helpers

THREADS = 1


def _apply(model: Any, cfg: TokenMergingConfig | None) -> None:
    if cfg is None:
        remove_token_merging(model)
    else:
        apply_token_merging(model, cfg)


def refdit_large(quick: bool) -> dict:
    """Single forwards of a random-weight RefDiT with a 32x32 target grid (1,024 tokens), timing only."""
    big = ts.build_model("refdit-s-128px").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 128, 128, generator=g)
    refs = [torch.rand(1, 3, 128, 128, generator=g) * 2 - 1]
    prompt = torch.zeros(1, 4, dtype=torch.long)
    cfgs: dict[str, TokenMergingConfig | None] = {
        "dense": None, "tome_r0.5": TokenMergingConfig(ratio=0.5),
        "tome_r0.5_cache5": TokenMergingConfig(ratio=0.5, recompute_every=5),
        "tome_r0.5_attn_only": TokenMergingConfig(ratio=0.5, merge_mlp=False)}
    times = (0.9, 0.8, 0.7, 0.6, 0.5)

    def run(cfg: TokenMergingConfig | None) -> Callable[[], None]:
        def fn() -> None:
            _apply(big, cfg)
            with torch.inference_mode():
                for t in times:
                    big(x, torch.tensor([t]), refs, prompt)
            remove_token_merging(big)
        return fn

    med = interleaved({k: run(c) for k, c in cfgs.items()}, repeats=2 if quick else 3)
    sp = speedups(med)
    return {"model": "refdit-s-128px (random weights)", "references": 1, "forwards_per_run": len(times),
            "target_tokens": big.config.grid ** 2, "seconds": med,
            "speedup": {k: v[mr.SPEED] for k, v in sp.items()}, "speedup_wall_and_cpu": sp}


# -------------------------------------------------------------------------------------------------- UNet


UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (64, 128, 256),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 256, "attention_head_dim": (1, 2, 4), "norm_num_groups": 32,  # head dim 64
}


class _Pipe:
    """A minimal SD-style denoising loop with ``.unet`` and ``.scheduler`` (what our hooks look for)."""

    def __init__(self, unet: torch.nn.Module, steps: int) -> None:
        from diffusers import DDIMScheduler

        self.unet, self.scheduler, self.steps = unet, DDIMScheduler(), steps

    @torch.inference_mode()
    def __call__(self, latent: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        self.scheduler.set_timesteps(self.steps)
        x = latent * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            eps = self.unet(x, t, ctx).sample
            x = self.scheduler.step(eps, t, x).prev_sample
        return x


def unet_part(quick: bool, steps: int) -> dict:
    import diffusers
    import tomesd

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNET_CONFIG).eval()
    pipe = _Pipe(unet, steps)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 64, 64, generator=g)
    ctx = torch.randn(2, 77, UNET_CONFIG["cross_attention_dim"], generator=g)

    cfgs: dict[str, Any] = {"dense": None}
    ratios = (0.5,) if quick else (0.5, 0.7)
    for r in ratios:
        cfgs[f"ours_r{r}"] = TokenMergingConfig(ratio=r, merge_mlp=False)  # tomesd's sublayers, centred cosine
    cfgs["tomesd_r0.5"] = "tomesd"
    if not quick:  # tomesd's raw cosine: the like-for-like matching
        cfgs["ours_r0.5_raw"] = TokenMergingConfig(ratio=0.5, merge_mlp=False, center=False)
    cfgs["ours_r0.5_cache5"] = TokenMergingConfig(ratio=0.5, merge_mlp=False, recompute_every=5)
    if not quick:
        cfgs["ours_catome_t0.6_every5"] = TokenMergingConfig(threshold=0.6, merge_mlp=False, recompute_every=5)

    def setup(cfg: Any) -> None:
        tomesd.remove_patch(unet)
        remove_token_merging(pipe)
        if cfg == "tomesd":
            tomesd.apply_patch(unet, ratio=0.5)
        elif cfg is not None:
            apply_token_merging(pipe, cfg)

    outs: dict[str, torch.Tensor] = {}

    def run(key: str) -> Callable[[], None]:
        def fn() -> None:
            outs[key] = pipe(latent, ctx)  # deterministic: every repeat gives the same latent
        return fn

    def prepare(cfg: Any) -> Callable[[], None]:
        def fn() -> None:  # switch, then one untimed generation (a whole one: a new one resets the caches)
            setup(cfg)
            pipe(latent, ctx)
        return fn

    med = interleaved({k: run(k) for k in cfgs}, repeats=2 if quick else 5, warmup=0,
                      prepare={k: prepare(c) for k, c in cfgs.items()})
    setup(None)
    dense = outs["dense"]
    peak = float(dense.max() - dense.min())
    sp = speedups(med)
    results = {}
    for k, c in cfgs.items():
        err = float((outs[k] - dense).pow(2).mean().sqrt() / dense.pow(2).mean().sqrt())
        results[k] = {
            "config": c.__dict__ if isinstance(c, TokenMergingConfig) else c,
            "seconds": med[k],
            "speedup": sp[k][mr.SPEED],
            "speedup_wall_and_cpu": sp[k],
            "psnr_to_dense": mr.pooled_psnr(outs[k], dense, peak) if k != "dense" else None,
            "rel_rmse_to_dense": err,
        }
    return {
        "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
        "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "top_level_tokens": 64 * 64,
        "batch": 2,
        "steps": steps,
        "sampler": "DDIM",
        "tomesd_version": getattr(tomesd, "__version__", "0.1.3"),
        "configs": results,
    }


# ------------------------------------------------------------------------------------------ primitives


def primitives(quick: bool) -> dict:
    """Matching + merge + unmerge alone, ours vs tomesd, on UNet-top-level-sized tokens (2, 4096, 64)."""
    from tomesd.merge import bipartite_soft_matching_random2d

    from tokensparse.merging import match, random_destinations

    x = torch.randn(2, 64 * 64, 64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    r = x.shape[1] // 2

    def ours() -> None:
        m = match(x, random_destinations(64, 64, g), num=r)  # raw cosine, as tomesd
        m.unmerge(m.merge(x))

    def theirs() -> None:
        merge, unmerge = bipartite_soft_matching_random2d(x, 64, 64, 2, 2, r, no_rand=False, generator=g)
        unmerge(merge(x))

    med = interleaved({"ours": ours, "tomesd": theirs}, repeats=10 if quick else 30, warmup=2)
    return {"tokens": list(x.shape), "merged": r, "seconds": med,
            "ours_over_tomesd_time": med["ours"][mr.SPEED] / med["tomesd"][mr.SPEED]}


# -------------------------------------------------------------------------------------------------- main


def summarize(out: dict) -> dict:
    s: dict[str, Any] = {}
    for key in mr.SUBJECTS:
        q, sp = out.get(f"{key}_quality"), out.get(f"{key}_speed")
        if q and sp:
            part = mr.summarize(q, sp)
            if key == "refdit":  # the headline: the keys at top level
                s.update(part)
            else:
                s[key] = part
    if out.get("refdit_large"):
        s["refdit_large_grid_tome_r0.5_speedup"] = out["refdit_large"]["speedup"]["tome_r0.5"]
        s["refdit_large_grid_tome_r0.5_cache5_speedup"] = out["refdit_large"]["speedup"]["tome_r0.5_cache5"]
    u = out.get("unet")
    if u:
        c = u["configs"]
        s["unet_ours_r0.5_speedup"] = c["ours_r0.5"]["speedup"]
        s["unet_tomesd_r0.5_speedup"] = c["tomesd_r0.5"]["speedup"]
        s["vs_tomesd_speed_ratio"] = c["ours_r0.5"]["speedup"] / c["tomesd_r0.5"]["speedup"]
        s["vs_tomesd_err_ratio"] = c["ours_r0.5"]["rel_rmse_to_dense"] / c["tomesd_r0.5"]["rel_rmse_to_dense"]
        if "ours_r0.5_raw" in c:
            s["vs_tomesd_speed_ratio_raw"] = c["ours_r0.5_raw"]["speedup"] / c["tomesd_r0.5"]["speedup"]
            s["vs_tomesd_err_ratio_raw"] = (c["ours_r0.5_raw"]["rel_rmse_to_dense"]
                                            / c["tomesd_r0.5"]["rel_rmse_to_dense"])
    if out.get("primitives"):
        s["primitives_ours_over_tomesd_time"] = out["primitives"]["ours_over_tomesd_time"]
    return s


def figure(out: dict) -> Any:
    plt = pyplot()
    panels = []
    for key in mr.SUBJECTS:
        q, sp = out.get(f"{key}_quality"), out.get(f"{key}_speed")
        if q and sp:
            pts = {k: (sp["speedup"][k], v["drop_db"]) for k, v in q["configs"].items()
                   if k in sp["speedup"] and k != "dense"}
            title = (f"RefDiT: {q['model']}, {q['target_tokens']} target tokens"
                     + (", K/V cache" if q["kv_cache"] else ""))
            panels.append((title, "PSNR drop to ground truth [dB]", pts))
    if "unet" in out:
        pts = {k: (v["speedup"], v["psnr_to_dense"]) for k, v in out["unet"]["configs"].items() if k != "dense"}
        panels.append(("SD-style UNet (64x64 latents): ours vs tomesd", "PSNR to dense [dB]", pts))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, ylabel, pts) in zip(axes[0], panels):
        for k, (x, y) in pts.items():
            marker, color = (("s", "tab:red") if "tomesd" in k else ("v", "tab:orange") if "sparse" in k
                             else ("^", "tab:green") if "catome" in k
                             else ("D", "tab:purple") if "adaptive" in k else ("o", "tab:blue"))
            ax.scatter(x, y, marker=marker, color=color)
            ax.annotate(k, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("speedup over dense (same run)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


PARTS = ("refdit_quality", "refdit_speed", "refdit_small_quality", "refdit_small_speed", "refdit_large", "unet",
         "primitives")


def read_previous(path: Path, ap: argparse.ArgumentParser) -> dict:
    """An existing ``--out``, whose parts not rerun are kept; ``ap.error`` before any work when it is not a JSON
    object (it failed after nothing, but with a traceback)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        old = exc
    if not isinstance(old, dict):
        ap.error(f"--out {path} exists but is not a results JSON object ({old!r:.80}); the parts not rerun are kept "
                 "from it: remove it or pass another --out")
    return old


def main() -> None:
    ap = parser(__doc__, "merging", "fewer configs, samples, steps and repeats")
    ap.add_argument("--part", default="all", help=f"comma list of {', '.join(PARTS)} (default: all); "
                    "results of parts not run are kept from an existing --out file")
    ap.add_argument("--model", default=None, help="the headline RefDiT instead of refdit-sparse-64px: a shipped "
                    "name, a checkpoint path or untrained:<config> (must support the K/V cache)")
    args = ap.parse_args()
    if args.model is not None:
        mr.SUBJECTS["refdit"] = dataclasses.replace(mr.SUBJECTS["refdit"], model=args.model)
    parts = PARTS if args.part == "all" else tuple(p.strip() for p in args.part.split(","))
    if any(p not in PARTS for p in parts):
        ap.error(f"--part takes a comma list of {PARTS}")
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    out: dict[str, Any] = {}
    if args.out.exists():  # keep the parts not rerun
        old = read_previous(args.out, ap)
        out.update({k: old[k] for k in PARTS if k in old and k not in parts and old.get("quick") == args.quick})
    steps = 8 if args.quick else 20
    runners = {f"{key}_{what}": (lambda fn=fn, sub=sub: fn(sub, args.quick, steps))
               for key, sub in mr.SUBJECTS.items() for what, fn in (("quality", mr.quality), ("speed", mr.speed))}
    runners.update({
        "refdit_large": lambda: refdit_large(args.quick),
        "primitives": lambda: primitives(args.quick),
        "unet": lambda: unet_part(args.quick, steps=2 if args.quick else 3)})
    for i, p in enumerate(parts):
        progress(i, len(parts), p)
        t0 = time.perf_counter()
        out[p] = runners[p]()
        out[p]["wall_seconds"] = time.perf_counter() - t0
        out[p]["tokensparse"] = ts.__version__  # parts kept from an earlier run keep theirs
        print(f"{p} done in {time.perf_counter() - t0:.0f}s", flush=True)
    progress(len(parts), len(parts), "done")
    out["summary"] = summarize(out)
    out["machine"] = {"platform": platform.platform(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "device": "cpu",
                      "speedup_basis": mr.SPEED,
                      "note": "shared 2-core machine, one torch thread; speedups are ratios of median CPU "
                              "(process) times within one part's run; wall-clock ratios are stored too"}
    out["quick"] = args.quick
    write_json(args.out, out, lambda: figure(out), dpi=120)
    print(json.dumps(out["summary"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
