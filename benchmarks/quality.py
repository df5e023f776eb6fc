"""Quality of RefDiT under reference dropping: base (training-free) vs the Sparse Context fine-tune.

    python benchmarks/quality.py [--quick] [--out benchmarks/results/quality.json]
        [--base refdit-base] [--sparse refdit-sparse] [--n 64] [--steps 20]

For each family of the held-out suite and keep in {1, 0.5, 0.25, 0.1} (random selection, fixed seed):
PSNR, coarse PSNR (layout) and SSIM against the exact ground truth, mean and 95 % interval; the
copy-reference and mean-image floors; and the reference-blind floor (the sparse model with no references).
Both models also run at keep 0.25 with ``proportional=True`` (dropped tokens' attention mass handed to their
nearest kept token; summary ``proportional_gain_db_keep025[model][family]``, over plain random 0.25).
Writes JSON with a `summary` and a PNG plot next to it.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from common import (
    check_device,
    evaluate,
    heldout_by_family,
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
from tokensparse.data import FAMILIES, floors
from tokensparse.metrics import coarse_psnr, mean_ci95, psnr, ssim

KEEPS = (1.0, 0.5, 0.25, 0.1)


def stats(values: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    return {k: dict(zip(("mean", "ci95"), mean_ci95(v))) for k, v in values.items()}


def main() -> None:
    ap = parser(__doc__, "quality", "16 samples per family, 10 steps")
    ap.add_argument("--base", default="refdit-base")
    ap.add_argument("--sparse", default="refdit-sparse")
    ap.add_argument("--n", type=positive_int, default=64, help="held-out samples per family")
    ap.add_argument("--steps", type=positive_int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="selection seed")
    ap.add_argument("--device", default="cpu", help="where the models run (cuda for recipe searches)")
    args = ap.parse_args()
    check_device(args.device, ap)
    n, steps = quick_or(args, "n", 16), quick_or(args, "steps", 10)
    t0 = time.time()
    models = {"base": load(args.base).to(args.device), "sparse": load(args.sparse).to(args.device)}
    size = models["base"].config.image_size
    data = heldout_by_family(n, size)

    results: dict = {"floors": {}, "base": {}, "sparse": {}, "ref_blind": {}, "proportional": {}}
    for fam, samples in data.items():
        target = torch.stack([s.target for s in samples])
        results["floors"][fam] = {
            name: stats({"psnr": psnr(pred, target), "coarse_psnr": coarse_psnr(pred, target),
                         "ssim": ssim(pred, target)})
            for name, pred in floors(samples).items()}
    runs = [(label, keep, False) for label in models for keep in KEEPS] + [(label, 0.25, True) for label in models]
    total = len(runs) + 1
    for done, (label, keep, prop) in enumerate(runs):
        name = f"{label} proportional" if prop else label
        progress(done, total, f"{name} keep {keep}")
        model = models[label]
        cache = not model.config.ref_attends_target  # the exact K/V cache wherever the model supports it
        ts.apply_sparse_context(model, ts.SparseContextConfig(keep=keep, selector="random", seed=args.seed,
                                                              cache=cache, proportional=prop))
        where = results["proportional"].setdefault(label, {}) if prop else results[label]
        for fam, samples in data.items():
            where.setdefault(str(keep), {})[fam] = stats(evaluate(model, samples, steps))
        ts.remove_sparse_context(model)
        print(f"{name} keep={keep}: " + ", ".join(f"{f} {where[str(keep)][f]['psnr']['mean']:.2f}" for f in FAMILIES),
              flush=True)
    done = len(runs)
    progress(done, total, "no references")
    for fam, samples in data.items():
        results["ref_blind"][fam] = stats(evaluate(models["sparse"], samples, steps, use_refs=False))

    def p(label: str, keep: float, fam: str) -> float:
        return results[label][str(keep)][fam]["psnr"]["mean"]

    best_floor = {f: max(results["floors"][f][k]["psnr"]["mean"] for k in ("copy_ref", "mean_image")) for f in FAMILIES}
    summary = {
        "dense_margin_db": {f: p("sparse", 1.0, f) - best_floor[f] for f in FAMILIES},
        "ref_gain_db": {f: p("sparse", 1.0, f) - results["ref_blind"][f]["psnr"]["mean"] for f in FAMILIES},
        "base_drop_db_keep010": {f: p("base", 1.0, f) - p("base", 0.1, f) for f in FAMILIES},
        "base_coarse_drop_db_keep010": {
            f: results["base"]["1.0"][f]["coarse_psnr"]["mean"] - results["base"]["0.1"][f]["coarse_psnr"]["mean"]
            for f in FAMILIES},
        "ft_gain_db_keep025": {f: p("sparse", 0.25, f) - p("base", 0.25, f) for f in FAMILIES},
        "ft_cost_db_keep1": {f: p("base", 1.0, f) - p("sparse", 1.0, f) for f in FAMILIES},
        "proportional_gain_db_keep025": {
            label: {f: results["proportional"][label]["0.25"][f]["psnr"]["mean"] - p(label, 0.25, f) for f in FAMILIES}
            for label in models},
        # ft_gain = ft_robustness - ft_cost: how much less the fine-tune loses to dropping, vs general training
        "ft_robustness_db_keep025": {f: (p("sparse", 0.25, f) - p("sparse", 1.0, f))
                                     - (p("base", 0.25, f) - p("base", 1.0, f)) for f in FAMILIES},
    }
    payload = {"quick": args.quick, "samples_per_family": n, "steps": steps, "selector": "random",
               "models": {"base": args.base, "sparse": args.sparse}, "keeps": list(KEEPS),
               "kv_cache": {k: not m.config.ref_attends_target for k, m in models.items()},
               "wall_s": time.time() - t0, "summary": summary, "results": results}
    progress(total, total, "done")
    write_json(args.out, payload, lambda: figure(payload), dpi=110)
    for k, v in summary.items():
        print(k, rounded(v, 2))
    print(f"wrote {args.out}")


def figure(payload: dict) -> Any:
    plt = pyplot()
    res, keeps = payload["results"], payload["keeps"]
    fig, axes = plt.subplots(1, len(FAMILIES), figsize=(4 * len(FAMILIES), 3.4), sharey=False)
    for ax, fam in zip(axes, FAMILIES):
        for label, style in (("base", "o--"), ("sparse", "s-")):
            ax.plot(keeps, [res[label][str(k)][fam]["psnr"]["mean"] for k in keeps], style, label=f"{label} PSNR")
            ax.plot(keeps, [res[label][str(k)][fam]["coarse_psnr"]["mean"] for k in keeps], style, alpha=0.4,
                    label=f"{label} coarse")
        for name, ls in (("copy_ref", ":"), ("mean_image", "-.")):
            ax.axhline(res["floors"][fam][name]["psnr"]["mean"], color="gray", ls=ls, lw=1, label=name)
        ax.axhline(res["ref_blind"][fam]["psnr"]["mean"], color="red", ls=":", lw=1, label="no refs")
        ax.set_xscale("log")
        ax.set_xticks(keeps, [str(k) for k in keeps])
        ax.set_title(fam)
        ax.set_xlabel("keep (random selection)")
    axes[0].set_ylabel("dB")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
