"""Sparse Context, FLUX.2's reference K/V cache and token merging, timed on a real diffusers FLUX.2 transformer.

    python benchmarks/flux_speed.py [--quick] [--out benchmarks/results/flux_speed.json]

The library's hooks on diffusers' own ``Flux2Transformer2DModel`` code (K/V processors of
``Flux2KleinKVPipeline``), random weights, scaled down to run on a CPU: FLUX.2 [klein]'s block layout
(double : single = 1 : 4, here 2 + 8 blocks, width 256, SwiGLU x3) with a 32x32-token target, 32 text tokens
and 1 or 4 references of 32x32 tokens (FLUX.2's time offsets 10, 20, ...). One CPU thread, process time,
interleaved repeats, each after an untimed warm-up call in the same setting; median.

Per setting: seconds per transformer call and per 20-step generation (the K/V-cache settings run one
extract call that caches the references, then cached calls without them: extract + 19 x cached, both
measured), FLOPs per generation, speedup over dense and efficiency = speedup / FLOP ratio. Settings: dense,
sparse keep 0.25 (uniform selection), ToMe ratio 0.5 on the target tokens, both, the K/V cache, sparse +
K/V cache, and all three. Sparse Context selects once per generation, here in the untimed warm-up call
(uniform selection costs next to nothing; a real K/V run pays it at its extract call); merging computes its
matchings in every timed call (``recompute_every=1``). Real FLUX.2 sizes are in ``flux_flops.py`` (FLOPs only,
no CPU timing).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from common import apply_setting, interleaved, parser, positive_int, progress, quick_or, rounded, write_json

from tokensparse.flops import count_flops

CONFIG = {"patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 8, "attention_head_dim": 64,
          "num_attention_heads": 4, "joint_attention_dim": 64, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
          "axes_dims_rope": (16, 16, 16, 16), "rope_theta": 2000, "guidance_embeds": False}
GRID, TEXT, STEPS = 32, 32, 20
SETTINGS = {  # name -> (keep, K/V cache, merge ratio)
    "dense": (1.0, False, 0.0),
    "sparse0.25": (0.25, False, 0.0),
    "tome0.5": (1.0, False, 0.5),
    "sparse0.25+tome0.5": (0.25, False, 0.5),
    "kv": (1.0, True, 0.0),
    "sparse0.25+kv": (0.25, True, 0.0),
    "sparse0.25+kv+tome0.5": (0.25, True, 0.5),
}


def build() -> torch.nn.Module:
    from diffusers import Flux2Transformer2DModel
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor,
    )

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**CONFIG).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing here, but keep activations in a sane range
        for p in model.parameters():
            p.mul_(0.5)
    for block in model.transformer_blocks:  # the processors of Flux2KleinKVPipeline; plain calls are unchanged
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return model


def grid_ids(t: int) -> torch.Tensor:
    rows, cols = torch.arange(GRID).repeat_interleave(GRID), torch.arange(GRID).repeat(GRID)
    return torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], -1)


def inputs(n_refs: int) -> tuple[dict, dict]:
    """Keyword arguments of (a plain / K/V-extract call with the references first, a cached call)."""
    g = torch.Generator().manual_seed(n_refs)
    c = CONFIG["in_channels"]
    target, refs = torch.randn(1, GRID * GRID, c, generator=g), torch.randn(1, n_refs * GRID * GRID, c, generator=g)
    ref_ids = torch.cat([grid_ids(10 * (i + 1)) for i in range(n_refs)])
    common = {"encoder_hidden_states": torch.randn(1, TEXT, CONFIG["joint_attention_dim"], generator=g),
              "txt_ids": torch.zeros(TEXT, 4), "return_dict": False}
    full = dict(common, hidden_states=torch.cat([refs, target], 1), img_ids=torch.cat([ref_ids, grid_ids(0)]))
    cached = dict(common, hidden_states=target, img_ids=grid_ids(0))
    return full, cached


class Clock:
    """A timestep that falls a little at every call: each call is a new denoising step of one long generation
    (so merging computes its matchings every call, as with ``recompute_every=1``, and the once-per-generation
    selection of Sparse Context is not redone)."""

    t = 0.999

    @classmethod
    def next(cls) -> torch.Tensor:
        cls.t -= 1e-6
        return torch.tensor([cls.t])


def configure(model: torch.nn.Module, setting: str) -> None:
    keep, _, merge = SETTINGS[setting]  # the K/V cache is the transformer's own (kv_cache_mode calls)
    apply_setting(model, keep, merge)


def calls(model: torch.nn.Module, setting: str, full: dict, cached: dict) -> dict[str, Callable[[], object]]:
    """The timed calls of a setting on :func:`inputs`: ``step`` (one call), or ``extract`` and ``step`` (cached)."""
    n_ref_tokens = full["hidden_states"].shape[1] - GRID * GRID
    if not SETTINGS[setting][1]:
        return {"step": lambda: model(**full, timestep=Clock.next())}
    box: dict = {}

    def extract() -> None:
        box["cache"] = model(**full, timestep=Clock.next(), kv_cache_mode="extract", num_ref_tokens=n_ref_tokens)[1]

    extract()
    return {"extract": extract,
            "step": lambda: model(**cached, timestep=Clock.next(), kv_cache=box["cache"], kv_cache_mode="cached")}


@torch.no_grad()
def run(n_refs: int, repeats: int) -> list[dict]:
    model = build()
    full, cached = inputs(n_refs)  # the same tensors for every setting
    runs, prepare, parts = {}, {}, {}
    flops: dict[str, int] = {}
    for s in SETTINGS:
        configure(model, s)
        fns = calls(model, s, full, cached)
        parts[s] = list(fns)
        flops[s] = sum(count_flops(fn) * (1 if part == "extract" else (STEPS - 1 if "extract" in fns else STEPS))
                       for part, fn in fns.items())
        for part, fn in fns.items():
            runs[f"{s}:{part}"] = fn
            prepare[f"{s}:{part}"] = lambda s=s, fn=fn: (configure(model, s), fn())  # switch, untimed warm-up
    med = interleaved(runs, repeats, warmup=0, prepare=prepare)
    rows = []
    dense_gen = STEPS * med["dense:step"]["cpu"]
    for s in SETTINGS:
        step = med[f"{s}:step"]["cpu"]
        extract = med[f"{s}:extract"]["cpu"] if "extract" in parts[s] else None
        gen = STEPS * step if extract is None else extract + (STEPS - 1) * step
        row = {"refs": n_refs, "setting": s, "step_seconds": step, "extract_seconds": extract,
               "generation_seconds": gen, "speedup": dense_gen / gen, "gflops": flops[s] / 1e9,
               "flop_ratio": flops["dense"] / flops[s],
               "step_times": med[f"{s}:step"]["cpu_all"]}
        row["efficiency"] = row["speedup"] / row["flop_ratio"]
        rows.append(row)
        print(f"refs={n_refs} {s:<24} step {step:6.3f} s  gen {gen:6.2f} s  {row['speedup']:5.2f}x  "
              f"FLOP ratio {row['flop_ratio']:5.2f}x  eff {row['efficiency']:.2f}", flush=True)
    return rows


def main() -> None:
    torch.set_num_threads(1)
    ap = parser(__doc__, "flux_speed", "1 reference, 2 repeats")
    ap.add_argument("--repeats", type=positive_int, default=5)
    args = ap.parse_args()
    t0 = time.time()
    ref_counts, repeats = ([1] if args.quick else [1, 4]), quick_or(args, "repeats", 2)
    rows = []
    for i, n in enumerate(ref_counts):
        progress(i, len(ref_counts), f"{n} reference(s)")
        rows += run(n, repeats)
    summary = {"speedup": {str(n): {r["setting"]: r["speedup"] for r in rows if r["refs"] == n} for n in ref_counts},
               "flop_ratio": {str(n): {r["setting"]: r["flop_ratio"] for r in rows if r["refs"] == n}
                              for n in ref_counts},
               "min_efficiency": min(r["efficiency"] for r in rows if r["setting"] != "dense")}
    write_json(args.out, {"quick": args.quick, "repeats": repeats, "steps": STEPS, "config": CONFIG,
                          "target_tokens": GRID * GRID, "ref_tokens_each": GRID * GRID, "text_tokens": TEXT,
                          "wall_s": time.time() - t0, "summary": summary, "rows": rows})
    for k, v in summary.items():  # was one dict with 16-digit floats
        print(k, rounded(v, 3))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
