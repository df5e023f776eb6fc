"""Speed of Sparse Context, the reference K/V cache, and both stacked (plus target-token merging).

    python benchmarks/speed.py [--quick] [--out benchmarks/results/speed.json]

For 1-4 references, at 16x16 tokens per image (refdit-s-64px; random weights serve for timing) and at
the shipped size (refdit-s, 8x8 tokens): CPU seconds per 20-step generation on one thread (process time,
so other jobs on a shared machine do not distort it; wall time is recorded too), interleaved repeats, each
right after an untimed 2-step warm-up in the same setting (steady state: a switch of setting leaves the
allocator without the new tensor sizes, and that first run pays page faults), median; speedup vs dense,
FLOPs per generation (CPU SDPA counted) and efficiency = measured speedup / FLOP ratio. Dense and sparse
run the joint model; "kv" runs the same weights built with ref_attends_target=False, whose context K/V are
computed once per generation. "tome0.5" merges half the target tokens in every block (ToMe, a new matching
each step); "tome0.5c5" merges the same number with CA-ToMe's cache, a layer's matching recomputed every 5th
step (`benchmarks/merging.py` measures what merging costs in quality).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from common import (
    apply_setting,
    interleaved,
    parser,
    positive_int,
    progress,
    pyplot,
    quick_or,
    rounded,
    speedups,
    write_json,
)

import tokensparse as ts
from tokensparse.flops import count_flops
from tokensparse.models.zoo import randomize_zero_init

SETTINGS = {  # name -> (keep, cache, merge ratio, merging's recompute_every)
    "dense": (1.0, False, 0.0, 1),
    "sparse0.5": (0.5, False, 0.0, 1),
    "sparse0.25": (0.25, False, 0.0, 1),
    "sparse0.1": (0.1, False, 0.0, 1),
    "kv": (1.0, True, 0.0, 1),
    "sparse0.25+kv": (0.25, True, 0.0, 1),
    "sparse0.25+kv+tome0.5": (0.25, True, 0.5, 1),  # ToMe: a new matching every step
    "sparse0.25+kv+tome0.5c5": (0.25, True, 0.5, 5),  # CA-ToMe's cache: matchings recomputed every 5th step
}
WIDTH = max(map(len, SETTINGS))  # the printed table's setting column
PROMPT = "compose first top left second bottom right on red plain"


def models(arch: str) -> dict[bool, ts.RefDiT]:
    """The joint model and the same weights as a cache-capable (separate-context) model."""
    torch.manual_seed(0)
    joint = randomize_zero_init(ts.build_model(arch).eval())  # else every untrained block is the identity
    sep = ts.build_model(arch, ref_attends_target=False).eval()
    sep.load_state_dict(joint.state_dict())
    return {False: joint, True: sep}


def configure(pair: dict[bool, ts.RefDiT], setting: str) -> ts.RefDiT:
    keep, cache, merge, every = SETTINGS[setting]
    model = pair[cache]
    apply_setting(model, keep, merge, cache, recompute_every=every)
    return model


def run(arch: str, n_refs_list: list[int], settings: list[str], repeats: int, steps: int,
        stage: tuple[int, int] = (0, 1)) -> list[dict]:
    pair = models(arch)
    size = pair[False].config.image_size
    rows = []
    for i, n_refs in enumerate(n_refs_list):
        progress(stage[0] * len(n_refs_list) + i, stage[1] * len(n_refs_list), f"{arch}, {n_refs} refs")
        g = torch.Generator().manual_seed(n_refs)
        refs = [torch.rand(3, size, size, generator=g) for _ in range(n_refs)]
        prompt = " ".join(PROMPT.split()[:3]) if n_refs == 1 else PROMPT

        def gen(setting: str, n_steps: int = steps, refs: list = refs, prompt: str = prompt) -> torch.Tensor:
            return ts.generate(configure(pair, setting), refs, prompt, steps=n_steps, seed=0)

        med = interleaved({s: (lambda s=s: gen(s)) for s in settings}, repeats, warmup=0,
                          prepare={s: (lambda s=s: gen(s, 2)) for s in settings})  # untimed 2-step warm-up
        flops = {s: count_flops(lambda s=s: gen(s)) for s in settings}
        sp = speedups(med)
        for s in settings:
            row = {"arch": arch, "refs": n_refs, "setting": s, "seconds": med[s]["cpu"], "speedup": sp[s]["cpu"],
                   "wall_seconds": med[s]["wall"], "wall_speedup": sp[s]["wall"],
                   "gflops": flops[s] / 1e9, "flop_ratio": flops["dense"] / flops[s], "times": med[s]["cpu_all"]}
            row["efficiency"] = row["speedup"] / row["flop_ratio"]
            rows.append(row)
            print(f"{arch} refs={n_refs} {s:<{WIDTH}} {row['seconds']:7.3f} s  {row['speedup']:5.2f}x  "
                  f"FLOP ratio {row['flop_ratio']:5.2f}x  eff {row['efficiency']:.2f}", flush=True)
        for m in pair.values():
            ts.remove_sparse_context(m)
            ts.remove_token_merging(m)
    return rows


def main() -> None:
    torch.set_num_threads(1)
    ap = parser(__doc__, "speed", "1 and 4 references, 3 repeats, 64px only")
    ap.add_argument("--repeats", type=positive_int, default=9)
    ap.add_argument("--steps", type=positive_int, default=20)
    args = ap.parse_args()
    settings = list(SETTINGS)
    repeats = quick_or(args, "repeats", 3)  # the JSON records the repeats each median was taken over
    t0 = time.time()
    if args.quick:
        rows = run("refdit-s-64px", [1, 4], settings, repeats, args.steps)
    else:
        rows = run("refdit-s-64px", [1, 2, 3, 4], settings, repeats, args.steps, (0, 2))
        rows += run("refdit-s", [1, 2, 3, 4], settings, repeats, args.steps, (1, 2))
    main_rows = [r for r in rows if r["arch"] == "refdit-s-64px"]
    speedup = {str(n): {r["setting"]: r["speedup"] for r in main_rows if r["refs"] == n} for n in (1, 4)}
    token_settings = [r for r in main_rows if r["setting"] != "dense" and "tome" not in r["setting"]]
    summary = {"speedup": speedup,
               # efficiency of the token-dropping / caching settings (gather, scatter, selection overheads)
               "min_efficiency": min(r["efficiency"] for r in token_settings),
               "min_efficiency_with_merging": min(r["efficiency"] for r in main_rows if r["setting"] != "dense"),
               "tokens_per_image": 256}
    write_json(args.out, {"quick": args.quick, "steps": args.steps, "repeats": repeats, "wall_s": time.time() - t0,
                          "summary": summary, "rows": rows}, lambda: figure(main_rows, args.steps), dpi=110)
    for k, v in summary.items():  # was one dict with 16-digit floats
        print(k, rounded(v, 3))
    print(f"wrote {args.out}")


def figure(rows: list[dict], steps: int) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in sorted({r["setting"] for r in rows} - {"dense"}, key=list(SETTINGS).index):
        pts = sorted((r["refs"], r["speedup"]) for r in rows if r["setting"] == s)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=s)
    ax.set_xlabel("references (16x16 tokens each)")
    ax.set_ylabel(f"speedup vs dense ({steps}-step generation)")
    ax.set_xticks(sorted({r["refs"] for r in rows}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
