"""Dense vs sparse RefDiT forward cost: median time (interleaved repeats after warm-up) and FLOPs.

    python benchmarks/forward_cost.py [--model refdit-s-64px] [--repeats 15]
        [--out benchmarks/results/forward_cost.json]

Random weights serve for timing. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import check_json_out, positive_int, write_json

import tokensparse as ts
from tokensparse.flops import count_flops
from tokensparse.vocab import tokenize

KEEPS = (1.0, 0.5, 0.25, 0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="refdit-s-64px",
                    help="the named RefDiT config timed, with random weights (default: refdit-s-64px)")
    ap.add_argument("--repeats", type=positive_int, default=15,
                    help="timed repeats per setting, interleaved, after warm-up; the median is reported (default: 15)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "forward_cost.json",
                    help="JSON to write, replaced if it exists (default: benchmarks/results/forward_cost.json)")
    args = ap.parse_args()
    check_json_out(args.out, ap)

    torch.manual_seed(0)
    model = ts.build_model(args.model).eval()
    size = model.config.image_size
    prompt = tokenize("place the subject top left")
    results = []
    for n_refs in (1, 4):
        g = torch.Generator().manual_seed(n_refs)
        refs = [torch.rand(1, 3, size, size, generator=g) * 2 - 1 for _ in range(n_refs)]
        x, t = torch.randn(1, 3, size, size, generator=g), torch.tensor([0.5])
        seqs = {}
        for keep in KEEPS:  # reference tokens embedded + selected once, as in a generation
            ts.apply_sparse_context(model, ts.SparseContextConfig(keep=keep, selector="uniform"))
            seqs[keep] = model.embed_references(refs, 1)
        ts.remove_sparse_context(model)
        times: dict[float, list[float]] = {k: [] for k in KEEPS}
        with torch.inference_mode():
            for _ in range(3):  # warm-up
                for keep in KEEPS:
                    model(x, t, seqs[keep], prompt)
            for _ in range(args.repeats):  # interleaved
                for keep in KEEPS:
                    t0 = time.perf_counter()
                    model(x, t, seqs[keep], prompt)
                    times[keep].append(time.perf_counter() - t0)
            flops = {k: count_flops(lambda k=k, x=x, t=t, seqs=seqs: model(x, t, seqs[k], prompt)) for k in KEEPS}
        dense_t, dense_f = statistics.median(times[1.0]), flops[1.0]
        for keep in KEEPS:
            med = statistics.median(times[keep])
            row = {"refs": n_refs, "keep": keep, "ref_tokens": int(seqs[keep].tokens.shape[1]),
                   "ms": 1000 * med, "gflops": flops[keep] / 1e9, "speedup": dense_t / med,
                   "flop_ratio": dense_f / flops[keep]}
            row["efficiency"] = row["speedup"] / row["flop_ratio"]
            results.append(row)
            print(f"refs={n_refs} keep={keep:<4} ref_tokens={row['ref_tokens']:>5} {row['ms']:8.2f} ms "
                  f"{row['gflops']:7.3f} GFLOP  speedup {row['speedup']:.2f}x  FLOP ratio {row['flop_ratio']:.2f}x "
                  f"eff {row['efficiency']:.2f}")
    write_json(args.out, {"model": args.model, "image_size": size, "tokens_per_image": model.config.grid ** 2,
                          "repeats": args.repeats, "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
