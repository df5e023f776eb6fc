"""Which reference-dropping distribution to fine-tune with (issue 4): short fine-tunes, measured side by side.

    python benchmarks/drop_sweep.py [--quick] [--out benchmarks/results/drop_sweep.json] [--steps 300]

Every arm starts from the shipped refdit-base in the cache-capable architecture (as recipes/sparse.json:
its learning rate with warm-up and decay, family weights, same data, noise and seed) and trains the same
number of steps; only the dropping distribution changes. ``dense`` (no dropping) is the control: it separates what
dropping buys from what the extra steps and the architecture change do. Each arm is then scored on
held-out samples per family at keep 1.0 and keep 0.25 (random selection, fixed seed) and at keep 0.25
with task-aware selection (``auto``), K/V cache on.
Runs are resumable (``runs/drop_sweep/<arm>``).

summary:
  psnr[arm][keep][family]               mean PSNR (dB); keys "1.0", "0.25" (random), "0.25_auto"
  gain_keep025_vs_dense[arm][family]    arm minus the dense control at keep 0.25 (what dropping buys)
  cost_keep1_vs_dense[arm][family]      dense control minus arm at keep 1.0 (what it costs with full refs)
  best_keep025_arm                      the dropping arm with the highest keep-0.25 PSNR summed over families
  best_arm                              the same among arms that cost <= 0.5 dB at keep 1.0 on every family
                                        (None when no arm does)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from common import evaluate, heldout_by_family, load, parser, positive_int, progress, quick_or, rounded, write_json

import tokensparse as ts
from tokensparse.train import DropConfig, TrainConfig, export_ema, train

ARMS: dict[str, DropConfig | None] = {
    "dense": None,
    "u0.05-1_full0.2": DropConfig(p_full=0.2, keep_min=0.05, keep_max=1.0),
    "u0.05-1_full0.5": DropConfig(p_full=0.5, keep_min=0.05, keep_max=1.0),
    # recipes/sparse.json's: the same, and in half of the samples the references keep what "auto" selection keeps
    "u0.05-1_full0.5_sel0.5": DropConfig(p_full=0.5, keep_min=0.05, keep_max=1.0, p_selected=0.5),
    "u0.05-0.5_full0.2": DropConfig(p_full=0.2, keep_min=0.05, keep_max=0.5),
    "u0.25-1_full0.5": DropConfig(p_full=0.5, keep_min=0.25, keep_max=1.0),
}
EVALS = {"1.0": (1.0, "random"), "0.25": (0.25, "random"), "0.25_auto": (0.25, "auto")}  # key -> keep, selector
BASE = str(Path(ts.__file__).parent / "weights" / "refdit-base.safetensors")  # the shipped one, from any cwd
RECIPE = json.loads((Path(__file__).resolve().parents[1] / "recipes" / "sparse.json").read_text())


def fine_tune(arm: str, drop: DropConfig | None, steps: int, root: Path) -> tuple[ts.RefDiT, float]:
    """Fine-tune (or resume) one arm; its EMA model and training wall minutes."""
    cfg = TrainConfig(out=str(root / arm), model=RECIPE["model"], init=BASE, steps=steps, batch_size=16,
                      lr=RECIPE["lr"], min_lr_frac=0.1, warmup=min(50, steps // 5), ema=0.99, drop=drop, seed=1,
                      family_weights=RECIPE["family_weights"],
                      ckpt_every=100, eval_every=10**9)
    train(cfg, log=lambda s: None, progress=False)
    path = root / f"{arm}.safetensors"
    export_ema(cfg.out, path)
    return load(str(path)), json.loads(path.with_suffix(".json").read_text())["wall_minutes"]


def main() -> None:
    torch.set_num_threads(1)
    ap = parser(__doc__, "drop_sweep", "30 steps, 8 samples per family, 6 steps")
    ap.add_argument("--steps", type=positive_int, default=300, help="fine-tuning steps per arm")
    ap.add_argument("--n", type=positive_int, default=32, help="held-out samples per family")
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "drop_sweep")
    args = ap.parse_args()
    steps, n, gen_steps = quick_or(args, "steps", 30), quick_or(args, "n", 8), (6 if args.quick else 10)
    stage = f"steps{steps}"  # runs of another length never resume these
    root = args.root / (("quick" if steps == 30 else f"quick_{stage}") if args.quick else stage)
    t0 = time.time()
    data = heldout_by_family(n, 32)
    psnr: dict = {}
    minutes: dict = {}
    for i, (arm, drop) in enumerate(ARMS.items()):
        progress(i, len(ARMS), f"fine-tune {arm}")
        model, minutes[arm] = fine_tune(arm, drop, steps, root)
        psnr[arm] = {}
        for key, (keep, selector) in EVALS.items():
            ts.apply_sparse_context(model, ts.SparseContextConfig(keep=keep, selector=selector, seed=0, cache=True))
            psnr[arm][key] = {fam: float(evaluate(model, s, gen_steps)["psnr"].mean()) for fam, s in data.items()}
        print(arm, {k: {f: round(v, 2) for f, v in d.items()} for k, d in psnr[arm].items()}, flush=True)
    fams = list(data)
    gain = {a: {f: psnr[a]["0.25"][f] - psnr["dense"]["0.25"][f] for f in fams} for a in ARMS}
    cost = {a: {f: psnr["dense"]["1.0"][f] - psnr[a]["1.0"][f] for f in fams} for a in ARMS}
    arms = [a for a in ARMS if a != "dense"]
    ok = [a for a in arms if max(cost[a].values()) <= 0.5]

    def score(arm: str) -> float:
        return sum(psnr[arm]["0.25"].values())

    base_info = json.loads(Path(BASE).with_suffix(".json").read_text())  # which refdit-base it started from
    base_steps, base_lr = base_info["step"], base_info["recipe"]["lr"]
    summary = {"psnr": psnr, "gain_keep025_vs_dense": gain, "cost_keep1_vs_dense": cost,
               "best_keep025_arm": max(arms, key=score), "best_arm": max(ok, key=score) if ok else None}
    progress(len(ARMS), len(ARMS), "done")
    write_json(args.out, {"quick": args.quick, "steps": steps, "n": n, "generation_steps": gen_steps,
                          "arms": {a: (asdict(d) if d else None) for a, d in ARMS.items()}, "train_minutes": minutes,
                          "wall_s": time.time() - t0, "base_steps": base_steps, "base_lr": base_lr,
                          "lr": RECIPE["lr"], "summary": summary})
    for a in ARMS:
        print(f"{a:<22} keep0.25 gain {rounded(gain[a], 2)}  keep1 cost {rounded(cost[a], 2)}")
    print("best arm:", summary["best_arm"], "| best at keep 0.25:", summary["best_keep025_arm"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
