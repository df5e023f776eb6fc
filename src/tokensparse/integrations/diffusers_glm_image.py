"""GLM-Image (``GlmImageTransformer2DModel``): its condition images' K/V-cache write calls, thinned.

``GlmImagePipeline`` calls the transformer once per condition image before the denoising loop (``kv_caches`` in mode
"write": that image's latent alone, its K/V stored), then every conditional denoising call reads the cached K/V.
Registered in :mod:`.diffusers_models`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .diffusers_layout import InContextAdapter, RefLayout, output_sample, with_sample


class GlmImageAdapter(InContextAdapter):
    """GLM-Image: each condition image has its own "write" call, whose K/V the denoising calls read from the cache.

    ``hidden_states`` is a latent ``(B, C, H, W)`` the transformer patchifies itself, with RoPE over its own
    ``H/p x W/p`` grid. A write call is thinned by handing the transformer the kept patches side by side, a
    ``(B, C, p, K p)`` latent, with their dense RoPE rows as ``image_rotary_emb`` and their ``prior_token_id`` /
    ``prior_token_drop``; the cache then stores the kept tokens' K/V, and :meth:`scatter` puts the output back on
    the dense grid (dropped tokens zero).

    Each write is selected on its own (:meth:`fresh_references`), with that image's pixels and its prompt
    (:meth:`call_inputs`): every sample of a batch gets its own selection (the cache is per sample), but condition
    images cannot share a budget (``allocate``). A sample's images draw on from one generator seeded ``cfg.seed``
    at its first image (:meth:`selection_generator`), so ``random`` keeps what a call holding all of them would
    keep (each image its own cells, as FLUX.2 / Kontext / Qwen's references), the same for every sample. The
    samples must keep equal token counts (the pipeline stacks their caches): counts that differ (adaptive budgets)
    are a ``ValueError`` at the first denoising call.
    """

    cache_refusal = ("cache=True is for Flux2KleinKVPipeline; GlmImagePipeline caches its condition images' K/V "
                     "itself (one write pass per image before the denoising loop, which Sparse Context thins): use "
                     "cache=False")
    selects_per_sample = True  # one write call per sample and image, each with that sample's prompt

    def __init__(self) -> None:
        self.rope: Any = None  # the transformer's GlmImageRotaryPosEmbed (attach)
        self.patch = 1
        self.first_write = -2  # state.forwards at the first write of the current pipeline call
        self.generator: torch.Generator | None = None  # the current sample's selection draws (selection_generator)

    def attach(self, transformer: torch.nn.Module, state: Any) -> list[Any]:
        """Remember the transformer's RoPE module and patch size (no companion hook)."""
        self.rope, self.patch = transformer.rope, int(transformer.config.patch_size)
        return []

    @staticmethod
    def _mode(kwargs: dict[str, Any]) -> str | None:
        caches = kwargs.get("kv_caches")
        return caches[0].mode if caches is not None and getattr(caches, "num_layers", 0) else None

    def tokens(self, kwargs: dict[str, Any]) -> Tensor:
        """The latent's patches ``(B, N, C p p)``, in the order of the transformer's ``image_projector``."""
        hs, p = kwargs["hidden_states"], self.patch
        b, c, h, w = hs.shape
        if h % p or w % p:
            raise ValueError(f"hidden_states {tuple(hs.shape)} is not a whole number of {p}x{p} patches")
        return hs.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // p ** 2, -1)

    def layout(self, kwargs: dict[str, Any]) -> RefLayout | None:
        if self._mode(kwargs) != "write":
            return None  # a call without a condition image (text-to-image, or no cache)
        _, _, h, w = kwargs["hidden_states"].shape
        grid = (h // self.patch, w // self.patch)
        n = grid[0] * grid[1]
        if kwargs["prior_token_id"].shape[-1] != n:
            raise ValueError(f"prior_token_id has {kwargs['prior_token_id'].shape[-1]} tokens but the latent {n}")
        cells = torch.arange(n, device=kwargs["hidden_states"].device)
        return RefLayout(n, [cells], [cells], [grid])

    def subset(self, kwargs: dict[str, Any], index: Tensor, layout: RefLayout, state: Any) -> dict[str, Any]:
        out, p = dict(kwargs), self.patch
        hs = kwargs["hidden_states"]
        kept = self.tokens(kwargs).index_select(1, index.to(hs.device))  # (B, K, C p p)
        b, k = kept.shape[:2]
        out["hidden_states"] = kept.reshape(b, k, hs.shape[1], p, p).permute(0, 2, 3, 1, 4).reshape(
            b, hs.shape[1], p, k * p)  # the kept patches side by side: the projector makes exactly these K tokens
        rope = kwargs.get("image_rotary_emb")
        if rope is None:
            rope = self.rope(hs)
        if not isinstance(rope, tuple) or any(r.shape[0] != layout.n for r in rope):
            raise ValueError(f"image_rotary_emb must be a (cos, sin) pair of {layout.n} rows")
        out["image_rotary_emb"] = tuple(r.index_select(0, index.to(r.device)) for r in rope)
        for name in ("prior_token_id", "prior_token_drop"):
            out[name] = kwargs[name].index_select(-1, index.to(kwargs[name].device))
        return out

    def scatter(self, output: Any, index: Tensor, layout: RefLayout) -> Any:
        """The thinned call's output ``(B, C, p, K p)`` on the dense ``(B, C, H, W)`` grid, dropped tokens zero."""
        sample = output_sample(output)
        (h, w), p = layout.grids[0], self.patch
        b, c = sample.shape[:2]
        kept = sample.reshape(b, c, p, -1, p).permute(0, 3, 1, 2, 4)  # (B, K, C, p, p)
        dense = kept.new_zeros(b, layout.n, c, p, p)
        dense[:, index.to(kept.device)] = kept
        dense = dense.reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h * p, w * p)
        return with_sample(output, dense)

    def fresh_references(self, kwargs: dict[str, Any]) -> bool:
        """Every write call brings its own condition image: select anew."""
        return self._mode(kwargs) == "write"

    def call_inputs(self, state: Any, kwargs: dict[str, Any]) -> tuple[list | None, list | None, bool]:
        """``(pixels, prompts, captured)`` for this write: the pipeline captured every condition image (sample-major)
        and the prompts once, just before its first write; write ``j`` of the call is image ``j``, of sample
        ``kv_caches``' current one."""
        cache = kwargs["kv_caches"][0]
        if cache.current_sample_idx == 0 and not cache.k_caches:  # the first write into a fresh cache
            self.first_write = state.forwards
        j, sample = state.forwards - self.first_write, cache.current_sample_idx
        images = state.images[j:j + 1] if state.images and state.images_tick == self.first_write else None
        prompts = (state.prompts[sample:sample + 1]
                   if state.prompts and state.prompts_tick == self.first_write else None)
        return images or None, prompts or None, self.first_write in (state.images_tick, state.prompts_tick)

    def selection_generator(self, cfg: Any, kwargs: dict[str, Any]) -> torch.Generator:
        """One generator per sample's condition images: seeded ``cfg.seed`` at the sample's first write (nothing
        cached for it yet), drawn on by its next images (each write was re-seeded alike: same-sized images kept
        the same ``random`` cells)."""
        cache = kwargs["kv_caches"][0]
        if self.generator is None or len(cache.k_caches) <= cache.current_sample_idx:
            self.generator = torch.Generator().manual_seed(cfg.seed)
        return self.generator

    def is_kv_cached_call(self, kwargs: dict[str, Any]) -> bool:
        """A denoising call: the condition K/V come from the cache ("read"), or not at all ("skip")."""
        mode = self._mode(kwargs)
        if mode == "read":
            lengths = {k.shape[1] for k in kwargs["kv_caches"][0].k_caches}
            if len(lengths) > 1:
                raise ValueError(
                    f"the samples' condition images left K/V caches of {sorted(lengths)} tokens; GLM-Image stacks "
                    "them per batch, so every sample must keep as many tokens (same-sized condition images, "
                    "and a fixed budget: not adaptive=True)")
        return mode in ("read", "skip")
