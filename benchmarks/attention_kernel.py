"""How fast CPU attention runs at the shapes `benchmarks/speed.py` times: why sparse settings fall short of their FLOP
ratio.

    python benchmarks/attention_kernel.py [--quick] [--out benchmarks/results/attention_kernel.json]

For each setting of `speed.py` (refdit-s-64px, 1 and 4 references) one denoising step is run with
`F.scaled_dot_product_attention` recorded: the shapes of its calls (the K/V-cached settings' once-per-generation
context pass is not a step's and is left out). Each setting's calls are then timed alone (one thread, process time,
interleaved repeats after warm-up, median) and reported as attention seconds per step, GFLOP/s, and the step's
attention speedup over dense next to its attention FLOP ratio. `kernel_efficiency` = attention speedup / attention
FLOP ratio: below 1 where the kernel runs the sparse shapes at fewer FLOP/s than the dense ones (PyTorch's CPU flash
attention splits keys in blocks of 512 and queries in blocks of 32, 64 or 256 by their count, so 523 tokens run
as 512 + 11).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from common import interleaved, parser, positive_int, quick_or, rounded, write_json
from speed import PROMPT, configure, models

import tokensparse as ts

SETTINGS = ("dense", "sparse0.5", "sparse0.25", "sparse0.1", "kv", "sparse0.25+kv")
ARCH = "refdit-s-64px"


def step_calls(pair: dict, setting: str, refs: list[torch.Tensor], prompt: str) -> list[tuple[tuple, tuple, bool]]:
    """``(q shape, k shape, masked)`` of each attention call of a step (a 1-step generation's calls, less the
    cached settings' context pass: the calls whose queries are the context's)."""
    seen: list[tuple[tuple, tuple, bool]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, **kw: Any) -> torch.Tensor:
        seen.append((tuple(q.shape), tuple(k.shape), attn_mask is not None))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    F.scaled_dot_product_attention = spy
    try:
        ts.generate(configure(pair, setting), refs, prompt, steps=1, seed=0)
    finally:
        F.scaled_dot_product_attention = sdpa
    depth = pair[False].config.depth
    return seen[-depth:]  # the step's one call per block (a cached setting's context pass comes first)


def flops(calls: list[tuple[tuple, tuple, bool]]) -> float:
    """QK^T and AV: ``4 * B * H * Nq * Nk * Dh`` per call."""
    return sum(4.0 * q[0] * q[1] * q[2] * k[2] * q[3] for q, k, _ in calls)


def runner(calls: list[tuple[tuple, tuple, bool]]) -> Any:
    g = torch.Generator().manual_seed(0)
    made = [(torch.randn(q, generator=g), torch.randn(k, generator=g), torch.randn(k, generator=g),
             torch.ones(k[0], 1, 1, k[2], dtype=torch.bool) if masked else None) for q, k, masked in calls]

    def run() -> None:
        for q, k, v, m in made:
            F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    return run


def main() -> None:
    torch.set_num_threads(1)
    ap = parser(__doc__, "attention_kernel", "9 repeats instead of 31")
    ap.add_argument("--repeats", type=positive_int, default=31)
    args = ap.parse_args()
    repeats = quick_or(args, "repeats", 9)
    t0 = time.time()
    pair = models(ARCH)
    size = pair[False].config.image_size
    rows = []
    for n_refs in (1, 4):
        g = torch.Generator().manual_seed(n_refs)
        refs = [torch.rand(3, size, size, generator=g) for _ in range(n_refs)]
        prompt = " ".join(PROMPT.split()[:3]) if n_refs == 1 else PROMPT  # as speed.py
        calls = {s: step_calls(pair, s, refs, prompt) for s in SETTINGS}
        for m in pair.values():
            ts.remove_sparse_context(m)
        med = interleaved({s: runner(c) for s, c in calls.items()}, repeats, warmup=2)
        for s in SETTINGS:
            q, k, masked = calls[s][0]
            sec = med[s]["cpu"]
            speedup, ratio = med["dense"]["cpu"] / sec, flops(calls["dense"]) / flops(calls[s])
            rows.append({"refs": n_refs, "setting": s, "queries": q[2], "keys": k[2], "masked": masked,
                         "heads": q[1], "head_dim": q[3], "calls": len(calls[s]), "seconds_per_step": sec,
                         "gflops_per_s": flops(calls[s]) / sec / 1e9, "attention_speedup": speedup,
                         "attention_flop_ratio": ratio, "kernel_efficiency": speedup / ratio})
            r = rows[-1]
            print(f"refs={n_refs} {s:<14} q={q[2]:5d} k={k[2]:5d} {sec * 1e3:7.2f} ms/step {r['gflops_per_s']:6.1f} "
                  f"GFLOP/s  speedup {speedup:5.2f}x  FLOP ratio {ratio:5.2f}x  eff {r['kernel_efficiency']:.2f}",
                  flush=True)
    summary = {"kernel_efficiency": {str(n): {r["setting"]: r["kernel_efficiency"] for r in rows if r["refs"] == n}
                                     for n in (1, 4)}}
    write_json(args.out, {"quick": args.quick, "arch": ARCH, "repeats": repeats, "wall_s": time.time() - t0,
                          "summary": summary, "rows": rows})
    print("kernel_efficiency", rounded(summary["kernel_efficiency"], 3))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
