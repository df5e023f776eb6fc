"""``tokensparse.generate``: one call from references and a prompt to images, for RefDiT."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .api import sparse_context_config
from .flow import SAMPLERS, noise_like, timesteps
from .generation import begin_generation
from .images import ImageLike, batch_images
from .models.refdit import RefDiT
from .vocab import tokenize


@torch.no_grad()
def generate(
    model: RefDiT,
    references: list[ImageLike],
    prompt: str | list[str],
    *,
    steps: int = 20,
    seed: int | list[int] = 0,
    shift: float = 1.0,
    sampler: str = "euler",
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Generate ``(B, 3, H, W)`` images in [0, 1].

    references: PIL images, arrays or tensors in [0, 1], each ``(3, H, W)`` or ``(B, 3, H, W)``; may be empty.
    prompt: one prompt, or a list of ``B`` prompts; ``""`` is the null condition.
    seed: sample ``i`` of the batch uses noise seed ``seed + i`` (independent of the batch it is in), or
        ``seed[i]`` when a list is given.
    Methods applied to ``model`` (sparse context, token merging) take effect; selection runs once per call.
    """
    if not isinstance(model, RefDiT):
        raise TypeError(f"generate expects a RefDiT, got {type(model).__name__}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    refs = batch_images(list(references))
    batch = max([len(prompts)] + [r.shape[0] for r in refs])
    if len(prompts) == 1:
        prompts = prompts * batch
    refs = [r.expand(batch, -1, -1, -1) if r.shape[0] == 1 else r for r in refs]
    if len(prompts) != batch:
        raise ValueError(f"{len(prompts)} prompts for a batch of {batch} references")

    device = next(model.parameters()).device
    cfg = model.config
    prompt_ids = tokenize(prompts, cfg.max_prompt_len).to(device)
    model_refs = [(r.to(device) * 2 - 1) for r in refs]
    begin_generation(model)
    ref_tokens = model.embed_references(model_refs, batch)  # embedding + selection: once per generation
    sparse_cfg = sparse_context_config(model)
    kv = model.context_kv(ref_tokens, prompt_ids) if sparse_cfg is not None and sparse_cfg.cache else None

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        return model(x, t, ref_tokens, prompt_ids, context_kv=kv)

    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(batch)]
    x = noise_like((batch, cfg.channels, cfg.image_size, cfg.image_size), seeds, device)
    x0 = SAMPLERS[sampler](denoise, x, timesteps(steps, shift).to(device), callback)
    return ((x0 + 1) / 2).clamp(0, 1)
