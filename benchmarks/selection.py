"""Task-aware token selection and adaptive budgets on RefDiT (issue 7).

    python benchmarks/selection.py [--quick] [--out benchmarks/results/selection.json]
        [--model refdit-sparse] [--n 32] [--steps 10]

For each family of the held-out suite: PSNR (coarse PSNR, SSIM) vs the *measured* average kept fraction
for every selector at fixed average budgets (keep in {0.1, 0.25, 0.5}; several references share their
budget by score for informed selectors), for adaptive budgets (a sweep over the covered score mass), and
at keep 1.0 (dense). Writes JSON with a `summary` and a PNG plot next to it.

summary:
  taskaware_minus_random_db[family]      auto minus random, both at an average budget of 25 %
  taskaware_drop_db_keep025[family]      keep 1.0 minus the task-aware default (auto) at an average budget of
                                         at most 25 %: the better of auto at a fixed 25 % and auto with the
                                         default adaptive budget (mass 0.9) where that keeps <= 25 % on average
                                         (<= 0.5: lossless); taskaware_keep025_config says which
  taskaware_adaptive_drop_db[family]     keep 1.0 minus auto with the default adaptive budget, and
  taskaware_adaptive_kept_frac[family]   the average fraction of reference tokens that budget keeps
  adaptive_tokens_frac_at_random25[family]  tokens adaptive auto needs to match random-25 % PSNR, / random's
  selection_overhead_frac                selection time (auto, multi-reference batch) / 20-step generation
  best_selector_keep025[family]          the best fixed-budget selector at 25 % (what `auto` encodes)
  proportional_gain_db_keep025[selector][family]  proportional=True minus plain, same selector at 25 %
  taskaware_proportional_drop_db_keep025[family]  taskaware_drop_db_keep025 with proportional=True (same rule)

`--proportional` names the selectors also run with ``proportional=True`` (dropped tokens' attention mass
handed to their nearest kept token) at every fixed budget and, for adaptive ones, every mass.

`--model` takes a shipped name, a checkpoint path (.safetensors, with or without its JSON), or
`untrained:<config>` (a randomly initialised model, to check that the script runs).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from common import (
    evaluate,
    float_list,
    heldout_by_family,
    load,
    median_time,
    names_list,
    parser,
    positive_int,
    progress,
    pyplot,
    quick_or,
    rounded,
    write_json,
)

import tokensparse as ts
from tokensparse.data import FAMILIES, batched
from tokensparse.metrics import mean_ci95
from tokensparse.selection import SCORERS

KEEPS = (0.1, 0.25, 0.5)
MASSES = (0.3, 0.6, 0.9, 0.97)
ADAPTIVE = ("auto",)


def cache_ok(model: ts.RefDiT) -> bool:
    """Sparse runs use the (exact) reference K/V cache wherever the model supports it, as users would."""
    return not model.config.ref_attends_target


class KeptCounter:
    """Records the kept fraction of reference tokens per sample (hook after Sparse Context's)."""

    def __init__(self, model: ts.RefDiT) -> None:
        self.fracs: list[torch.Tensor] = []
        self.handle = model.ref_embedder.register_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        self.fracs.append(output.counts().float() / output.dense_len)

    def mean(self) -> float:
        return float(torch.cat(self.fracs).mean()) if self.fracs else 1.0

    def close(self) -> None:
        self.handle.remove()


def run(model: ts.RefDiT, cfg: ts.SparseContextConfig | None, samples: list, steps: int) -> dict:
    """Generate the samples under ``cfg`` (None = dense): metrics (mean, ci95) and the mean kept fraction."""
    if cfg is None:
        ts.remove_sparse_context(model)
    else:
        ts.apply_sparse_context(model, cfg)
    counter = KeptCounter(model)
    try:
        vals = evaluate(model, samples, steps)
    finally:
        counter.close()
        ts.remove_sparse_context(model)
    out = {k: dict(zip(("mean", "ci95"), mean_ci95(v))) for k, v in vals.items()}
    out["kept_frac"] = counter.mean() if cfg is not None else 1.0
    return out


def tokens_to_match(points: list[tuple[float, float]], target: float) -> float | None:
    """Smallest kept fraction at which the (frac, psnr) curve reaches ``target`` (linear interpolation)."""
    pts = sorted(points)
    if not pts:
        return None
    if pts[0][1] >= target:
        return pts[0][0]
    for (f0, p0), (f1, p1) in itertools.pairwise(pts):
        if p1 >= target > p0 or (p0 < target <= p1):
            return f0 + (f1 - f0) * (target - p0) / max(p1 - p0, 1e-9)
    return None


def overhead(model: ts.RefDiT, samples: list, selector: str, steps: int = 20, repeats: int = 3,
             proportional: bool = False) -> dict:
    """Selection time (embedding with selection minus without) / one 20-step generation, on one batch."""
    _, b = next(batched(samples, 8))
    refs = [r * 2 - 1 for r in b.refs]
    prompt_ids = ts.tokenize(b.prompts, model.config.max_prompt_len)

    def embed() -> None:
        with torch.no_grad():
            model.embed_references(refs, len(b.prompts), prompt_ids)

    ts.remove_sparse_context(model)
    embed()
    dense_embed = median_time(embed, repeats * 3)
    ts.apply_sparse_context(model, ts.SparseContextConfig(keep=0.25, selector=selector, cache=cache_ok(model),
                                                          proportional=proportional))
    embed()
    sparse_embed = median_time(embed, repeats * 3)
    gen = median_time(lambda: ts.generate(model, b.refs, b.prompts, steps=steps), repeats)
    ts.remove_sparse_context(model)
    sel = max(sparse_embed - dense_embed, 0.0)
    return {"selector": selector, "proportional": proportional, "batch": len(b.prompts), "selection_s": sel,
            "generation_s": gen, "frac": sel / gen}


def main() -> None:
    ap = parser(__doc__, "selection", "8 samples per family, 5 steps, keep 0.25 only, masses 0.6 and 0.9 (a flag "
                                                  "typed beside it keeps its value)")
    ap.add_argument("--model", default="refdit-sparse")
    ap.add_argument("--n", type=positive_int, default=32, help="held-out samples per family")
    ap.add_argument("--steps", type=positive_int, default=10,
                    help="sampling steps of the quality runs (timing uses 20)")
    ap.add_argument("--seed", type=int, default=0, help="selection seed")
    ap.add_argument("--selectors", default=",".join(s for s in SCORERS))
    ap.add_argument("--keeps", default=",".join(map(str, KEEPS)))
    ap.add_argument("--masses", default=",".join(map(str, MASSES)))
    ap.add_argument("--adaptive", default=",".join(ADAPTIVE), help="selectors swept with adaptive budgets")
    ap.add_argument("--families", default=",".join(FAMILIES), help="a subset, for exploration")
    ap.add_argument("--proportional", default="auto,random",
                    help="selectors also run with proportional=True (empty: none)")
    ap.add_argument("--skip-overhead", action="store_true", help="do not time selection (exploration)")
    args = ap.parse_args()
    # every list checked here, before the dense runs: a misspelt selector failed only after them
    proportional = names_list(ap, "--proportional", args.proportional, sorted(SCORERS), empty_ok=True)
    selectors = names_list(ap, "--selectors", args.selectors, sorted(SCORERS))
    adaptive = names_list(ap, "--adaptive", args.adaptive, sorted(SCORERS), empty_ok=True)
    families = names_list(ap, "--families", args.families, FAMILIES)
    n, steps = quick_or(args, "n", 8), quick_or(args, "steps", 5)
    keeps = float_list(ap, "--keeps", quick_or(args, "keeps", "0.25"))
    # quick: the default mass too, so that the summary's adaptive keys (taskaware_adaptive_*) are exercised
    masses = float_list(ap, "--masses", quick_or(args, "masses", f"0.6,{ts.SparseContextConfig().mass}"))
    t0 = time.time()
    model = load(args.model)
    data = {f: v for f, v in heldout_by_family(n, model.config.image_size).items() if f in families}
    fams = list(data)

    res: dict = {"dense": {}, "fixed": {}, "adaptive": {}, "proportional": {"fixed": {}, "adaptive": {}}}
    for fam, samples in data.items():
        res["dense"][fam] = run(model, None, samples, steps)
    print("dense: " + ", ".join(f"{f} {res['dense'][f]['psnr']['mean']:.2f}" for f in fams), flush=True)
    total = ((len(selectors) + len(proportional)) * len(keeps)
             + (len(adaptive) + len(set(adaptive) & set(proportional))) * len(masses))
    done = 0
    for prop in (False, True):
        where = res["proportional"] if prop else res
        label = " proportional" if prop else ""
        for sel in proportional if prop else selectors:
            for keep in keeps:
                progress(done, total, f"{sel}{label} keep {keep}")
                done += 1
                cfg = ts.SparseContextConfig(keep=keep, selector=sel, seed=args.seed, cache=cache_ok(model),
                                             proportional=prop)
                r = where["fixed"].setdefault(sel, {}).setdefault(str(keep), {})
                for fam, samples in data.items():
                    r[fam] = run(model, cfg, samples, steps)
                print(f"{sel}{label} keep={keep}: " + ", ".join(f"{f} {r[f]['psnr']['mean']:.2f}" for f in fams),
                      flush=True)
        for sel in [s for s in adaptive if s in proportional] if prop else adaptive:
            for mass in masses:
                progress(done, total, f"{sel}{label} adaptive mass {mass}")
                done += 1
                cfg = ts.SparseContextConfig(keep=1.0, selector=sel, adaptive=True, mass=mass, seed=args.seed,
                                             cache=cache_ok(model), proportional=prop)
                r = where["adaptive"].setdefault(sel, {}).setdefault(str(mass), {})
                for fam, samples in data.items():
                    r[fam] = run(model, cfg, samples, steps)
                print(f"{sel}{label} adaptive mass={mass}: " + ", ".join(
                    f"{f} {r[f]['psnr']['mean']:.2f}@{r[f]['kept_frac']:.2f}" for f in fams), flush=True)

    def p(sel: str, keep: float, fam: str, where: dict = res) -> float:
        return where["fixed"][sel][str(keep)][fam]["psnr"]["mean"]

    def taskaware(where: dict) -> tuple[dict, dict, tuple[dict, dict] | None]:
        """Dense minus the task-aware default within a 25 % budget (auto at 25 %, or the adaptive default
        where it keeps <= 25 % and does better), the config that gave it, and the adaptive default's drop and
        kept fraction (None when not run)."""
        drop = {f: res["dense"][f]["psnr"]["mean"] - p("auto", 0.25, f, where) for f in fams}
        config = {f: "auto keep 0.25" for f in fams}
        default_mass = str(ts.SparseContextConfig().mass)
        ada = where["adaptive"].get("auto", {}).get(default_mass)
        if ada is None:
            return drop, config, None
        ada_drop = {f: res["dense"][f]["psnr"]["mean"] - ada[f]["psnr"]["mean"] for f in fams}
        for f in fams:
            if ada[f]["kept_frac"] <= 0.25 and ada_drop[f] < drop[f]:
                drop[f], config[f] = ada_drop[f], f"auto adaptive mass {default_mass}"
        return drop, config, (ada_drop, {f: ada[f]["kept_frac"] for f in fams})

    summary: dict = {}
    if "auto" in selectors and "random" in selectors and 0.25 in keeps:
        summary["taskaware_minus_random_db"] = {f: p("auto", 0.25, f) - p("random", 0.25, f) for f in fams}
        drop, config, ada = taskaware(res)
        summary["taskaware_drop_db_keep025"], summary["taskaware_keep025_config"] = drop, config
        if ada is not None:
            summary["taskaware_adaptive_drop_db"], summary["taskaware_adaptive_kept_frac"] = ada
    if 0.25 in keeps and proportional:
        prop = res["proportional"]
        summary["proportional_gain_db_keep025"] = {
            s: {f: p(s, 0.25, f, prop) - p(s, 0.25, f) for f in fams} for s in proportional if s in selectors}
        if "auto" in proportional:
            drop, config, _ = taskaware(prop)
            summary["taskaware_proportional_drop_db_keep025"] = drop
            summary["taskaware_proportional_keep025_config"] = config
    if 0.25 in keeps:
        summary["best_selector_keep025"] = {f: max(selectors, key=lambda s: p(s, 0.25, f)) for f in fams}
    if "auto" in res["adaptive"] and "random" in selectors and 0.25 in keeps:
        fr = {}
        for f in fams:
            pts = [(r[f]["kept_frac"], r[f]["psnr"]["mean"]) for r in res["adaptive"]["auto"].values()]
            random_frac = res["fixed"]["random"]["0.25"][f]["kept_frac"]
            m = tokens_to_match(pts, p("random", 0.25, f))
            fr[f] = None if m is None else m / random_frac
        summary["adaptive_tokens_frac_at_random25"] = fr
    timed = [("auto", "auto"), ("attention", "attention")] + (
        [("auto proportional", "auto")] if "auto" in proportional else [])
    over = {} if args.skip_overhead else {
        name: overhead(model, data[fams[-1]], sel, proportional=name.endswith("proportional")) for name, sel in timed}
    if over:
        summary["selection_overhead_frac"] = over["auto"]["frac"]
        summary["selection_overhead_frac_attention"] = over["attention"]["frac"]
        if "auto proportional" in over:
            summary["selection_overhead_frac_proportional"] = over["auto proportional"]["frac"]

    payload = {"quick": args.quick, "model": args.model, "samples_per_family": n, "steps": steps,
               "keeps": list(keeps), "masses": list(masses), "selectors": selectors, "wall_s": time.time() - t0,
               "summary": summary, "overhead": over, "results": res}
    progress(total, total, "done")
    write_json(args.out, payload, lambda: figure(payload), dpi=110)
    for k, v in summary.items():
        print(k, rounded(v, 3))
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


def figure(payload: dict) -> Any:
    plt = pyplot()
    res = payload["results"]
    fams = list(res["dense"])
    fig, axes = plt.subplots(1, len(fams), figsize=(4.3 * len(fams), 3.6), squeeze=False)
    axes = axes[0]
    colors = dict(zip(payload["selectors"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, fam in zip(axes, fams):
        for sel, by_keep in res["fixed"].items():
            pts = sorted((r[fam]["kept_frac"], r[fam]["psnr"]["mean"]) for r in by_keep.values())
            ax.plot(*zip(*pts), "o-", color=colors.get(sel), label=sel, ms=4)
        for sel, by_mass in res["adaptive"].items():
            pts = sorted((r[fam]["kept_frac"], r[fam]["psnr"]["mean"]) for r in by_mass.values())
            ax.plot(*zip(*pts), "x--", color=colors.get(sel), label=f"{sel} adaptive", ms=5, alpha=0.8)
        for sel, by_keep in res.get("proportional", {}).get("fixed", {}).items():
            pts = sorted((r[fam]["kept_frac"], r[fam]["psnr"]["mean"]) for r in by_keep.values())
            ax.plot(*zip(*pts), "d:", color=colors.get(sel), label=f"{sel} proportional", ms=5)
        ax.axhline(res["dense"][fam]["psnr"]["mean"], color="k", lw=1, ls=":", label="keep 1.0")
        ax.set_xlim(0, 1.0)
        ax.set_title(fam)
        ax.set_xlabel("average kept fraction of reference tokens")
    axes[0].set_ylabel("PSNR (dB)")
    axes[-1].legend(fontsize=6, loc="lower right")
    fig.suptitle(f"token selection, {payload['model']}", fontsize=9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
