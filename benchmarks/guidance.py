"""Sparse Guidance vs classifier-free guidance on RefDiT (issue 9): FID against FLOPs per step.

    python benchmarks/guidance.py [--quick] [--out benchmarks/results/guidance.json] [--model refdit-routed]

FID: the held-out prompt-only ``scene`` task (one right prompt, many right images), generated images vs the
same number of held-out ground-truth images, in the shipped FeatureNet's space (`tokensparse.metrics.fid`).
Configurations: unguided; CFG over scales; Sparse Guidance (both branches conditional) over a
(gamma_strong, gamma_weak) grid and scales; CFG+SG (null condition in the weak branch). FLOPs per step are
counted (``tokensparse.flops``: FlopCounterMode with the CPU SDPA formulas) for one sample over a whole
generation, divided by the number of steps. A cache-capable model (``ref_attends_target=False``, like the
shipped refdit-routed) runs with its context K/V cache on (exact; the one-time context pass is in the count),
and SG's two conditional branches share the blocks before the route span (exact; CFG's branches differ from
the first block).
Sparse-reference guidance: on the reference families, PSNR against ground truth of the unguided model vs SG
whose weak branch sees 10 % of the reference tokens (both branches unrouted), and what it costs.

summary:
  cfg_best_fid, sg_best_fid                 best FID over CFG scales / over SG configurations
  flops_frac_at_cfg_best_fid                least SG FLOPs/step reaching CFG's best FID, / CFG's FLOPs/step
  sg_best_fid_flops_frac                    FLOPs/step of SG's best configuration, / CFG's
  sparse_ref_guidance_gain_db[family]       PSNR of sparse-reference SG minus unguided
  sparse_ref_guidance_cost_frac             its extra FLOPs per step, / unguided
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from common import (
    at_least_two,
    float_list,
    interleaved,
    load,
    parser,
    positive_int,
    progress,
    pyplot,
    quick_or,
    rounded,
    write_json,
)

import tokensparse as ts
from tokensparse.data import FAMILIES, batched, heldout
from tokensparse.flops import count_flops
from tokensparse.metrics import fid, mean_ci95, psnr

CFG_SCALES = (1.25, 1.5, 2.0, 3.0, 4.0)
SG_GAMMAS = ((0.0, 0.5), (0.0, 0.75), (0.25, 0.75), (0.5, 0.9), (0.75, 0.9), (0.9, 0.95))
SG_SCALES = (1.5, 2.0, 3.0)


def configs(quick: bool, cfg_scales=CFG_SCALES, sg_gammas=SG_GAMMAS, cfg_sg: bool = True
            ) -> dict[str, ts.CFGConfig | ts.SparseGuidanceConfig | None]:
    out: dict = {"unguided": None}
    if quick:  # two CFG scales: the defaults' middle ones, or the first two given (CFG rows are never empty)
        cfg_scales = cfg_scales[1:3] if len(cfg_scales) > 2 else cfg_scales[:2]
    for w in cfg_scales:
        out[f"cfg w={w}"] = ts.CFGConfig(scale=w)
    for gs, gw in sg_gammas[:2] if quick else sg_gammas:
        for w in SG_SCALES[:2] if quick else SG_SCALES:
            out[f"sg {gs}/{gw} w={w}"] = ts.SparseGuidanceConfig(scale=w, strong=gs, weak=gw)
    for w in (SG_SCALES[:1] if quick else SG_SCALES) if cfg_sg else ():
        out[f"cfg+sg 0.0/0.75 w={w}"] = ts.SparseGuidanceConfig(scale=w, strong=0.0, weak=0.75, null_weak=True)
    return out


def generate_all(model: ts.RefDiT, samples: list, steps: int, guidance, batch_size: int = 128) -> torch.Tensor:
    out = torch.empty(len(samples), 3, model.config.image_size, model.config.image_size)
    for idx, b in batched(samples, batch_size):
        out[idx] = ts.generate(model, b.refs, b.prompts, steps=steps, seed=[samples[i].seed for i in idx],
                               guidance=guidance)
    return out


def flops_per_step(model: ts.RefDiT, sample, guidance, steps: int) -> float:
    """FLOPs of one whole ``steps``-step generation (one-time context pass included) / ``steps``."""
    return count_flops(lambda: ts.generate(model, sample.refs, sample.prompt, steps=steps, guidance=guidance)) / steps


def train_step_speed(model: ts.RefDiT, repeats: int = 7) -> dict:
    """Training step (forward + backward) time and FLOPs with TREAD routing at 0.5 vs none, per family.

    Timed on one thread in process time (as speed.py), so other jobs on a shared machine do not distort it;
    wall time is kept too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_steps(model, repeats)
    finally:
        torch.set_num_threads(threads)


def _train_steps(model: ts.RefDiT, repeats: int) -> dict:
    from tokensparse.data import make_batch

    out = {}
    for task, n_refs in (("scene", 0), ("place", 1), ("compose", 3)):
        b = make_batch(task, list(range(16)), model.config.image_size, n_refs)
        refs, ids = [r * 2 - 1 for r in b.refs], ts.tokenize(b.prompts, model.config.max_prompt_len)
        x, t = b.target * 2 - 1, torch.full((16,), 0.5)
        model.train()

        def step(route: float, x: torch.Tensor = x, t: torch.Tensor = t, refs: list = refs,
                 ids: torch.Tensor = ids) -> None:
            g = torch.Generator().manual_seed(0)
            model(x, t, refs, ids, route=route, route_generator=g).pow(2).mean().backward()
            model.zero_grad(set_to_none=True)

        med = interleaved({r: (lambda r=r: step(r)) for r in (0.0, 0.5)}, repeats, warmup=1)
        flops = {r: count_flops(lambda r=r: step(r)) for r in med}
        model.eval()
        sec = {r: v["cpu"] for r, v in med.items()}
        wall = {r: v["wall"] for r, v in med.items()}
        out[task] = {"refs": n_refs, "seconds": sec[0.0], "seconds_routed": sec[0.5],
                     "speedup": sec[0.0] / sec[0.5], "wall_speedup": wall[0.0] / wall[0.5],
                     "flop_ratio": flops[0.0] / flops[0.5]}
        print(f"train step {task} ({n_refs} refs): routing 0.5 {out[task]['speedup']:.2f}x "
              f"(FLOP ratio {out[task]['flop_ratio']:.2f}x)", flush=True)
    return out


def main() -> None:
    ap = parser(__doc__, "guidance", "64 images, 8 steps, --n-ref 8, a few configurations (a flag typed "
                                                "beside it keeps its value)")
    ap.add_argument("--model", default="refdit-routed")
    ap.add_argument("--n", type=at_least_two, default=256, help="generated (and real) images for FID")
    ap.add_argument("--steps", type=positive_int, default=12)
    ap.add_argument("--n-ref", type=positive_int, default=32, help="held-out samples per reference family")
    ap.add_argument("--cfg-scales", default=",".join(map(str, CFG_SCALES)))
    ap.add_argument("--sg-gammas", default=",".join(f"{a}/{b}" for a, b in SG_GAMMAS),
                    help="comma list of strong/weak routing pairs")
    ap.add_argument("--fid-only", action="store_true",
                    help="only the FID sweep (no CFG+SG, sparse-reference guidance or routing timing)")
    args = ap.parse_args()
    cfg_scales = float_list(ap, "--cfg-scales", args.cfg_scales, hi=float("inf"))
    try:
        sg_gammas = tuple(tuple(float(x) for x in pair.split("/")) for pair in args.sg_gammas.split(",") if pair)
    except ValueError:
        sg_gammas = ()
    if not sg_gammas or any(len(pair) != 2 or not 0 <= pair[0] <= pair[1] < 1 for pair in sg_gammas):
        ap.error(f"--sg-gammas takes a comma list of strong/weak pairs with 0 <= strong <= weak < 1, "
                 f"got {args.sg_gammas!r}")
    n, steps, n_ref = quick_or(args, "n", 64), quick_or(args, "steps", 8), quick_or(args, "n_ref", 8)
    t0 = time.time()
    model = load(args.model)
    kv_cache = not model.config.ref_attends_target
    if kv_cache:  # exact: context K/V once per generation and branch condition
        ts.apply_sparse_context(model, ts.SparseContextConfig(keep=1.0, cache=True))
    samples = heldout("open", n, model.config.image_size)
    real = torch.stack([s.target for s in heldout("open", 2 * n, model.config.image_size)[n:]])

    rows, todo = [], configs(args.quick, cfg_scales, sg_gammas, cfg_sg=not args.fid_only)
    total = len(todo) + (0 if args.fid_only else len(FAMILIES) + 1)
    for i, (name, g) in enumerate(todo.items()):
        progress(i, total, name)
        t1 = time.time()
        value = fid(generate_all(model, samples, steps, g), real)
        kind = name.split()[0]
        gflops = flops_per_step(model, samples[0], g, steps) / 1e9
        rows.append({"config": name, "kind": kind, "fid": value, "gflops_per_step": gflops,
                     "seconds": time.time() - t1})
        print(f"{name:<24} FID {value:8.3f}  {rows[-1]['gflops_per_step']:.4f} GFLOP/step", flush=True)

    cfg_rows = [r for r in rows if r["kind"] == "cfg"]
    sg_rows = [r for r in rows if r["kind"] == "sg"]
    cfg_best = min(cfg_rows, key=lambda r: r["fid"])
    sg_best = min(sg_rows, key=lambda r: r["fid"])
    matching = [r for r in sg_rows if r["fid"] <= cfg_best["fid"]]
    summary: dict = {
        "cfg_best_fid": cfg_best["fid"], "cfg_best_config": cfg_best["config"],
        "sg_best_fid": sg_best["fid"], "sg_best_config": sg_best["config"],
        "unguided_fid": rows[0]["fid"],
        "flops_frac_at_cfg_best_fid": (min(r["gflops_per_step"] for r in matching) / cfg_best["gflops_per_step"]
                                       if matching else None),
        "sg_best_fid_flops_frac": sg_best["gflops_per_step"] / cfg_best["gflops_per_step"],
    }

    if args.fid_only:
        payload = {"quick": args.quick, "model": args.model, "n": n, "steps": steps, "fid_only": True,
                   "kv_cache": kv_cache, "wall_s": time.time() - t0, "summary": summary, "rows": rows}
        finish(payload, args.out, summary, total)
        return

    # sparse-reference guidance on the reference families
    sref = ts.SparseGuidanceConfig(scale=1.5, strong=0.0, weak=0.0, weak_keep=0.1)
    ref_rows: dict = {}
    for i, fam in enumerate(FAMILIES):
        progress(len(todo) + i, total, f"sparse-reference guidance, {fam}")
        fam_samples = heldout(fam, n_ref, model.config.image_size)
        target = torch.stack([s.target for s in fam_samples])
        ref_rows[fam] = {}
        for label, g in (("unguided", None), ("sparse_ref_sg", sref)):
            scores = psnr(generate_all(model, fam_samples, steps, g), target)
            ref_rows[fam][label] = dict(zip(("mean", "ci95"), mean_ci95(scores)))
        print(f"{fam}: unguided {ref_rows[fam]['unguided']['mean']:.2f} dB, sparse-reference SG "
              f"{ref_rows[fam]['sparse_ref_sg']['mean']:.2f} dB", flush=True)
    s0 = heldout("multi", 1, model.config.image_size)[0]
    f_plain, f_sref = flops_per_step(model, s0, None, steps), flops_per_step(model, s0, sref, steps)
    summary["sparse_ref_guidance_gain_db"] = {f: r["sparse_ref_sg"]["mean"] - r["unguided"]["mean"]
                                              for f, r in ref_rows.items()}
    summary["sparse_ref_guidance_cost_frac"] = f_sref / f_plain - 1

    progress(total - 1, total, "routing: training step time")
    ts.remove_sparse_context(model)
    routing = train_step_speed(model, 3 if args.quick else 7)
    summary["routing_train_speedup"] = {k: v["speedup"] for k, v in routing.items()}
    summary["routing_train_flop_ratio"] = {k: v["flop_ratio"] for k, v in routing.items()}

    payload = {"quick": args.quick, "model": args.model, "n": n, "steps": steps, "n_ref": n_ref, "kv_cache": kv_cache,
               "wall_s": time.time() - t0, "summary": summary, "rows": rows, "sparse_reference": ref_rows,
               "routing_training": routing}
    finish(payload, args.out, summary, total)


def finish(payload: dict, out: Path, summary: dict, total: int) -> None:
    """Write the JSON and plot and print the summary; the last progress line completes the ``total`` stages."""
    progress(total, total, "done")
    write_json(out, payload, lambda: figure(payload), dpi=120)
    for k, v in summary.items():
        print(k, rounded(v, 3))
    print(f"wrote {out}")


def figure(payload: dict) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("unguided", "k*"), ("cfg", "o-"), ("sg", "s"), ("cfg+sg", "^")):
        pts = sorted((r["gflops_per_step"], r["fid"]) for r in payload["rows"] if r["kind"] == kind)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=kind, alpha=0.8)
    ax.set_xlabel("GFLOPs per denoising step (one image)")
    ax.set_ylabel("FID (FeatureNet features)")
    ax.set_title(f"guidance on {payload['model']}, {payload['n']} images, {payload['steps']} steps")
    ax.legend()
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
