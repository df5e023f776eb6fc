"""FLOPs per denoising step of the real FLUX.2 [klein] 9B / 4B and FLUX.1 Kontext [dev] transformers
with Sparse Context, with and without FLUX.2 klein's reference K/V cache.

No weights: each transformer is built on the meta device from its published config and run once per
setting under ``tokensparse.flops.flop_counter`` (on meta, SDPA decomposes into counted matmuls; the
script checks the dense 9B count against a closed-form count). Output: 1024x1024 (64x64 = 4096 target
tokens), 512 text tokens, 1-4 references of 1024x1024 (4096 tokens each), keep in {1, 0.5, 0.25, 0.1}.

K/V cache (diffusers ``Flux2KleinKVPipeline``): step 0 runs the references once ("extract": references
attend only to themselves, their K/V are stored); every later step runs target + text tokens attending
to the cached reference K/V. We report the per-step cost of a cached step, and the one-time reference
pass separately (extract step minus a cached step). FLUX.1 Kontext has no K/V-cache pipeline in
diffusers and takes one reference, so its rows have ``refs=1`` and no cache.

Run: ``PYTHONPATH=src python benchmarks/flux_flops.py`` (73 s on a 2-core CPU in the committed run: ``seconds`` in the
JSON) -> ``benchmarks/results/flux_flops.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import check_json_out, positive_int, write_json

from tokensparse.flops import count_flops
from tokensparse.selection import count_for_ratio

# Published transformer configs. FLUX.2 klein: black-forest-labs/flux2 src/flux2/model.py (Klein4BParams,
# Klein9BParams), as written in the transformer/config.json of black-forest-labs/FLUX.2-klein-4B and
# FLUX.2-klein-9B (the same values appear in mflux 0.20 model_config.py and DiffSynth-Studio's
# model_configs.py): hidden 24x128 / 32x128, 5+20 / 8+24 blocks, Qwen3-4B / Qwen3-8B text features from
# 3 layers (3x2560 = 7680 / 3x4096 = 12288), 128 latent channels, mlp_ratio 3, 4-axis RoPE (32 each),
# theta 2000, no guidance embedding.
FLUX2_KLEIN_4B = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 5,
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "guidance_embeds": False,
}
FLUX2_KLEIN_9B = dict(
    FLUX2_KLEIN_4B, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288
)
# FLUX.1 Kontext [dev]: black-forest-labs/FLUX.1-Kontext-dev transformer/config.json, the FLUX.1 [dev]
# architecture (black-forest-labs/flux src/flux/util.py "flux-dev-kontext": hidden 3072 = 24x128,
# 19 double + 38 single blocks, T5 4096-d context, CLIP 768-d pooled vector, guidance embedding,
# RoPE axes 16/56/56); these are also FluxTransformer2DModel's defaults in diffusers.
FLUX1_KONTEXT_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

TARGET_TOKENS = 64 * 64  # 1024 px / 8 (VAE) / 2 (2x2 patches)
REF_TOKENS = 64 * 64
TEXT_TOKENS = 512
KEEPS = (1.0, 0.5, 0.25, 0.1)
DTYPE = torch.bfloat16
META = torch.device("meta")


def _flux2(cfg: dict) -> torch.nn.Module:
    from diffusers import Flux2Transformer2DModel

    with META:
        return Flux2Transformer2DModel(**cfg).to(DTYPE).eval()


def _flux2_kv_processors(model: torch.nn.Module) -> None:
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor,
    )

    for block in model.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())


def _flux2_inputs(model: torch.nn.Module, n_img: int) -> dict:
    c = model.config
    return {
        "hidden_states": torch.empty(1, n_img, c.in_channels, device=META, dtype=DTYPE),
        "encoder_hidden_states": torch.empty(1, TEXT_TOKENS, c.joint_attention_dim, device=META, dtype=DTYPE),
        "timestep": torch.empty(1, device=META, dtype=DTYPE),
        "img_ids": torch.zeros(1, n_img, 4, device=META, dtype=torch.long),
        "txt_ids": torch.zeros(1, TEXT_TOKENS, 4, device=META, dtype=torch.long),
        "return_dict": False,
    }


def flux2_step_flops(model: torch.nn.Module, n_ref: int) -> int:
    """One plain denoising step with ``n_ref`` reference tokens in the sequence."""
    kw = _flux2_inputs(model, TARGET_TOKENS + n_ref)
    with torch.no_grad():
        return count_flops(lambda: model(**kw))


def flux2_kv_flops(model: torch.nn.Module, n_ref: int) -> tuple[int, int]:
    """``(extract step, cached step)`` FLOPs with the K/V cache holding ``n_ref`` reference tokens."""
    kw = _flux2_inputs(model, TARGET_TOKENS + n_ref)
    holder = {}

    def extract() -> None:
        holder["cache"] = model(**kw, kv_cache_mode="extract", num_ref_tokens=n_ref)[1]

    with torch.no_grad():
        extract_flops = count_flops(extract)
        kw_cached = _flux2_inputs(model, TARGET_TOKENS)
        cached_flops = count_flops(
            lambda: model(**kw_cached, kv_cache=holder["cache"], kv_cache_mode="cached")
        )
    return extract_flops, cached_flops


def kontext_step_flops(model: torch.nn.Module, n_ref: int) -> int:
    n_img = TARGET_TOKENS + n_ref
    kw = {
        "hidden_states": torch.empty(1, n_img, 64, device=META, dtype=DTYPE),
        "encoder_hidden_states": torch.empty(1, TEXT_TOKENS, 4096, device=META, dtype=DTYPE),
        "pooled_projections": torch.empty(1, 768, device=META, dtype=DTYPE),
        "timestep": torch.empty(1, device=META, dtype=DTYPE),
        "guidance": torch.empty(1, device=META, dtype=DTYPE),
        "img_ids": torch.zeros(n_img, 3, device=META),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3, device=META),
        "return_dict": False,
    }
    with torch.no_grad():
        return count_flops(lambda: model(**kw))


def flux2_closed_form(cfg: dict, n_img: int) -> int:
    """Closed-form FLOPs of the dense FLUX.2 blocks (projections + attention), to check the counter."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    hidden = int(d * cfg["mlp_ratio"])
    n = n_img + TEXT_TOKENS
    layers = cfg["num_layers"] + cfg["num_single_layers"]
    # per token and layer: q,k,v,out (4 d^2) + SwiGLU in (2 * hidden * d) + out (hidden * d), 2 FLOPs per MAC
    linear = 2 * n * layers * (4 * d * d + 3 * hidden * d)
    attention = 4 * n * n * d * layers
    return linear + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "flux_flops.json",
                        help="JSON to write, replaced if it exists (default: benchmarks/results/flux_flops.json)")
    parser.add_argument("--max-refs", type=positive_int, default=4,
                        help="FLUX.2 [klein] rows for 1 to this many references (default: 4; Kontext takes one)")
    args = parser.parse_args()
    check_json_out(args.out, parser)
    t0 = time.perf_counter()
    rows = []
    checks = {}
    for name, cfg in (("FLUX.2-klein-9B", FLUX2_KLEIN_9B), ("FLUX.2-klein-4B", FLUX2_KLEIN_4B)):
        model = _flux2(cfg)
        params = sum(p.numel() for p in model.parameters())
        dense_4 = flux2_step_flops(model, 4 * REF_TOKENS)
        closed = flux2_closed_form(cfg, TARGET_TOKENS + 4 * REF_TOKENS)
        checks[name] = {
            "params": params,
            "counted_4refs_tflop": dense_4 / 1e12,
            "closed_form_blocks_tflop": closed / 1e12,
            "relative_difference": (dense_4 - closed) / dense_4,
        }
        _flux2_kv_processors(model)  # identical to the default processors when no K/V arguments are given
        no_ref = flux2_step_flops(model, 0)
        rows.append(
            {"model": name, "refs": 0, "keep": None, "kept_ref_tokens": 0, "step_tflop": no_ref / 1e12}
        )
        for refs in range(1, args.max_refs + 1):
            dense = None
            for keep in KEEPS:
                n_ref = refs * count_for_ratio(REF_TOKENS, keep)
                step = flux2_step_flops(model, n_ref)
                dense = dense or step
                extract, cached = flux2_kv_flops(model, n_ref)
                rows.append(
                    {
                        "model": name,
                        "refs": refs,
                        "keep": keep,
                        "kept_ref_tokens": n_ref,
                        "seq_len": TEXT_TOKENS + TARGET_TOKENS + n_ref,
                        "step_tflop": step / 1e12,
                        "speedup": dense / step,
                        "kv_cache": {
                            "step_tflop": cached / 1e12,
                            "speedup": dense / cached,
                            "extract_step_tflop": extract / 1e12,
                            "reference_pass_tflop": (extract - cached) / 1e12,
                            "speedup_4_steps": 4 * dense / (extract + 3 * cached),
                            "speedup_50_steps": 50 * dense / (extract + 49 * cached),
                        },
                    }
                )
                print(
                    f"{name} refs={refs} keep={keep}: {step / 1e12:.1f} TFLOP/step ({dense / step:.2f}x), "
                    f"K/V {cached / 1e12:.1f} ({dense / cached:.2f}x), ref pass {(extract - cached) / 1e12:.1f}",
                    flush=True,
                )
    model = None
    with META:
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel(**FLUX1_KONTEXT_DEV).to(DTYPE).eval()
    dense = None
    for keep in KEEPS:
        n_ref = count_for_ratio(REF_TOKENS, keep)
        step = kontext_step_flops(model, n_ref)
        dense = dense or step
        rows.append(
            {
                "model": "FLUX.1-Kontext-dev",
                "refs": 1,
                "keep": keep,
                "kept_ref_tokens": n_ref,
                "seq_len": TEXT_TOKENS + TARGET_TOKENS + n_ref,
                "step_tflop": step / 1e12,
                "speedup": dense / step,
                "kv_cache": None,
            }
        )
        print(f"Kontext keep={keep}: {step / 1e12:.1f} TFLOP/step ({dense / step:.2f}x)", flush=True)
    result = {
        "description": "FLOPs per denoising step (one transformer forward, batch 1, no guidance pass) at 1024x1024 "
        "with references of 1024x1024; speedup = dense step FLOPs (same refs, keep=1, no cache) / "
        "this setting's per-step FLOPs. kv_cache.step_tflop: a step after the first, with the kept "
        "references' K/V cached; kv_cache.reference_pass_tflop: the one-time reference pass "
        "(extract step minus a cached step); speedup_4_steps/50_steps amortize it.",
        "target_tokens": TARGET_TOKENS,
        "ref_tokens_per_image": REF_TOKENS,
        "text_tokens": TEXT_TOKENS,
        "flop_convention": "multiply-add = 2 FLOPs (torch.utils.flop_counter)",
        "configs": {
            "FLUX.2-klein-9B": FLUX2_KLEIN_9B,
            "FLUX.2-klein-4B": FLUX2_KLEIN_4B,
            "FLUX.1-Kontext-dev": FLUX1_KONTEXT_DEV,
        },
        "checks": checks,
        "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"wrote {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
