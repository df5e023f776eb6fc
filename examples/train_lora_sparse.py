"""Fine-tune a FLUX.2 [klein] LoRA with random reference-token dropping, then generate with Sparse Context.

    # a real model (a base, non-distilled klein is the usual LoRA target) and your data:
    python examples/train_lora_sparse.py --model black-forest-labs/FLUX.2-klein-base-4B --data pairs/ --out lora/
    # offline smoke run on a tiny random-weight pipeline with synthetic data:
    python examples/train_lora_sparse.py --model tiny --steps 20 --resolution 32 --out /tmp/lora

``--data`` holds one folder per example: ``ref*.png`` (one or more references), ``target.png`` and
``prompt.txt``. Without ``--data`` the script makes synthetic examples (the target is the reference
mirrored) so that the whole loop runs anywhere. Multi-GPU: ``accelerate launch examples/train_lora_sparse.py``.
Checkpoints go to ``--out``/checkpoints every ``--save-every`` steps; running again with the same arguments (or more
``--steps``) resumes from the newest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image, ImageOps

from tokensparse.context import SparseContextConfig
from tokensparse.integrations.diffusers import apply_sparse_context_diffusers
from tokensparse.integrations.diffusers_lora import (
    Example,
    LoraTrainConfig,
    check_data_out,
    examples_digest,
    find_checkpoint,
    load_examples,
    train_lora_sparse,
)
from tokensparse.run_processes import cpu_only


def synthetic_examples(n: int, size: int, seed: int) -> list[Example]:
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        ref = Image.fromarray((rng.rand(max(size, 64), max(size, 64), 3) * 255).astype("uint8"))
        out.append(Example([ref], ImageOps.mirror(ref), "mirror the image"))
    return out


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Flux2KleinPipeline directory or Hub id, or 'tiny'")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--keep-min", type=float, default=0.1)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint every this many steps")
    parser.add_argument(
        "--sample-keep", type=float, default=0.25, help="keep ratio of the sample made at the end"
    )
    args = parser.parse_args(argv)

    if args.model == "tiny":
        from tokensparse.integrations.diffusers_tiny import tiny_flux2_klein

        pipe = tiny_flux2_klein(seed=args.seed)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.model, local_files_only=Path(args.model).is_dir())
    if args.data:
        check_data_out(args.data, args.out)  # the next run would read --out as an example
    examples = load_examples(args.data) if args.data else synthetic_examples(4, args.resolution, args.seed)
    cfg = LoraTrainConfig(
        steps=args.steps,
        lr=args.lr,
        rank=args.rank,
        keep_min=args.keep_min,
        resolution=args.resolution,
        max_sequence_length=args.max_sequence_length,
        seed=args.seed,
        save_every=args.save_every,
    )
    sample_cfg = SparseContextConfig(keep=args.sample_keep, selector="uniform")  # checked before training
    every = max(1, args.steps // 20)
    main_process = PartialState(cpu=cpu_only()).is_main_process  # under accelerate / torchrun: one writer
    resume = find_checkpoint(args.out, cfg, examples_digest(examples))
    if resume is not None and main_process:
        print(f"resuming from {resume[0]} at step {resume[1]['step']}")
    losses = train_lora_sparse(
        pipe,
        examples,
        cfg,
        args.out,
        log=lambda s, k, loss: print(f"step {s:5d} keep {k:.2f} loss {loss:.4f}") if s % every == 0 and main_process
        else None,
    )

    if not main_process:  # the main process samples and writes sample.png (every process writing it raced)
        return losses
    # sample with the trained LoRA and Sparse Context
    apply_sparse_context_diffusers(pipe, sample_cfg)
    pipe.set_progress_bar_config(disable=True)
    refs = [r if min(r.size) >= 64 else r.resize((max(r.width, 64), max(r.height, 64))) for r in examples[0].refs]
    image = pipe(  # (training resizes references to its resolution; the pipeline refuses any under 64 px)
        image=refs,
        prompt=examples[0].prompt,
        height=args.resolution,
        width=args.resolution,
        num_inference_steps=4,
        max_sequence_length=args.max_sequence_length,
        generator=torch.Generator().manual_seed(args.seed),
    ).images[0]
    image.save(args.out / "sample.png")
    print(f"saved LoRA and sample to {args.out}")
    return losses


if __name__ == "__main__":
    main()
