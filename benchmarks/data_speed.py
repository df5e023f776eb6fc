"""Measure task-suite throughput: samples/s through ``train_batches`` (single process), per image size.

    python benchmarks/data_speed.py [--quick] [--out benchmarks/results/data_speed.json]

Reports the bank build time (first use, per size), the stream's samples/s (median over repeats, after a
warm-up), and per-task samples/s of ``make_sample`` at the training size. Writes JSON.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch
from common import parser, write_json

import tokensparse
from tokensparse.data import TASKS, get_bank, make_sample, train_batches


def stream_rate(batch_size: int, image_size: int, n_batches: int, repeats: int) -> list[float]:
    it = train_batches(batch_size, image_size=image_size, seed=0)
    for _ in range(3):  # warm-up (lazy caches)
        next(it)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = sum(len(next(it)) for _ in range(n_batches))
        rates.append(n / (time.perf_counter() - t))
    return rates


def main() -> None:
    args = parser(__doc__, "data_speed", "fewer batches and sizes (a few seconds)").parse_args()
    torch.set_num_threads(1)
    sizes = [32] if args.quick else [16, 32, 64, 128]
    n_batches, repeats = (10, 3) if args.quick else (30, 5)
    result: dict = {
        "quick": args.quick,
        "tokensparse": tokensparse.__version__,  # the task suite's speed changes with its code
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "settings": {"batch_size": 64, "n_batches": n_batches, "repeats": repeats, "processes": 1},
        "bank_build_s": {},
        "stream_samples_per_s": {},
        "per_task_samples_per_s_32": {},
    }
    for s in sizes:
        t = time.perf_counter()
        get_bank(s)
        result["bank_build_s"][str(s)] = round(time.perf_counter() - t, 3)
        rates = stream_rate(64, s, n_batches if s <= 64 else max(3, n_batches // 4), repeats)
        result["stream_samples_per_s"][str(s)] = {
            "median": round(statistics.median(rates)),
            "min": round(min(rates)),
            "max": round(max(rates)),
        }
        print(
            f"size {s:4d}: bank {result['bank_build_s'][str(s)]:.2f} s, "
            f"stream {statistics.median(rates):8.0f} samples/s (median of {repeats})"
        )
    for task in TASKS:
        n = 200 if args.quick else 1000
        t = time.perf_counter()
        for seed in range(n):
            make_sample(task, seed, 32)
        result["per_task_samples_per_s_32"][task] = round(n / (time.perf_counter() - t))
        print(f"  {task:14s} {result['per_task_samples_per_s_32'][task]:7d} samples/s (make_sample, 32 px)")
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
