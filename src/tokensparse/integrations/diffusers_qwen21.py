"""Sparse Context on Qwen-Image 2.1 (``QwenImage21Transformer2DModel``, ``QwenImage21Pipeline``).

The pipeline passes ``hidden_states (B, N, C)``: the packed latents of every condition image, then the target's,
each row-major, with ``img_shapes[b] = [(1, h, w) per condition image, ..., (1, H, W) target]``. The transformer
interleaves them with the text: ``img_mask`` marks the Qwen3-VL ``<|image_pad|>`` slots of the prompt (each stands
for 2x2 latent tokens; the pipeline appends the target's slots), the slots are expanded four-fold and the latent
tokens written into them in order, giving one joint ``[text, image 1, text, ..., target]`` sequence. From it
the transformer makes, all over the joint sequence: RoPE rows (``pos_embed``: a frame index that text advances
and each image holds, and a centred row / column grid per image), per-image block ids (``build_token_metadata``)
for the block-causal attention (a flex ``BlockMask`` or per-segment masks, ``segments``), the target mask choosing
each token's modulation row, the text padding mask (``key_valid``), and the prefix length whose K/V the pipeline's
cache stores (``cache_write_slice``); later "cached" steps run the target alone against the cached prefix.

None of that can be expressed by thinning the call's own arguments (slots are four tokens each), so the call is
left as it is and companion pre-hooks on every transformer block and on ``norm_out`` keep the kept tokens' rows
of the joint sequence in each of those per-token arguments (computed once per call, shared by the blocks). The
cache then holds the kept prefix only, and a cached step's key mask is thinned to it. The output (the joint
sequence) is scattered back to its dense length, so the pipeline's ``noise_pred[:, -n_target:]`` is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
from torch import Tensor

from .calls import as_keywords, positional_names
from .diffusers_layout import InContextAdapter, RefLayout, output_sample, with_sample


@dataclass
class Qwen21Call:
    """A thinned Qwen-Image 2.1 call over the joint sequence of ``n`` tokens.

    index: kept joint positions (sorted: all text and target tokens, the kept condition-image tokens).
    prefix: kept tokens before the target (text + kept condition images): the K/V the cache holds.
    image_ids: ``(K,)`` block id of each kept token (-1 for text), as ``build_token_metadata`` gives them.
    cached: a ``"cached"`` call (the target's queries against the cached prefix): only its key mask is thinned.
    """

    index: Tensor
    n: int
    prefix: int
    image_ids: Tensor
    cached: bool
    memo: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def thin(self, name: str, dense: Any, make: Any) -> Any:
        """``make(dense)``, computed once per call for the ``dense`` argument every block receives."""
        if name not in self.memo or self.memo[name][0] is not dense:
            self.memo[name] = (dense, make(dense))
        return self.memo[name][1]

    def segments(self) -> list[tuple[int, int, bool]]:
        """``(start, end, is_text)`` runs of equal block ids over the kept prefix (the processors' segments)."""
        ids = self.image_ids[: self.prefix].tolist()
        runs, start = [], 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[start]:
                runs.append((start, i, ids[start] < 0))
                start = i
        return runs


class QwenImage21Adapter(InContextAdapter):
    """Qwen-Image 2.1: condition images first, then the target, in ``hidden_states``; see the module docstring."""

    cache_refusal = ("cache=True needs a pipeline with a reference K/V cache Sparse Context adds to "
                     "(Flux2KleinKVPipeline); QwenImage21Pipeline has a text and reference K/V cache of its own "
                     "(use_kv_cache=True, its default), which Sparse Context already thins with cache=False: it caches "
                     "the kept reference tokens only")

    def __init__(self) -> None:
        self.metadata: Any = None  # the transformer's build_token_metadata, read at attach
        self.state: Any = None  # the hook's state (its running call), read at attach

    def layout(self, kwargs: dict[str, Any]) -> RefLayout | None:
        shapes = kwargs.get("img_shapes")
        if not shapes or not isinstance(shapes[0], (list, tuple)) or len(shapes[0]) < 2:
            return None
        sizes = [prod(s) for s in shapes[0]]
        n = sum(sizes)
        if kwargs["hidden_states"].shape[1] != n:
            raise ValueError(f"hidden_states has {kwargs['hidden_states'].shape[1]} tokens but img_shapes says {n}")
        device = kwargs["hidden_states"].device
        positions, cells, grids, start = [], [], [], 0
        for (f, h, w), size in zip(shapes[0][:-1], sizes[:-1]):
            positions.append(torch.arange(start, start + size, device=device))
            cells.append(torch.arange(size, device=device))
            grids.append((f * h, w))
            start += size
        return RefLayout(n, positions, cells, grids)

    def cache_mode(self, kwargs: dict[str, Any]) -> Any:
        return None  # the K/V-extract, cached and uncached calls of a generation share one selection

    def subset(self, kwargs: dict[str, Any], index: Tensor, layout: RefLayout, state: Any) -> dict[str, Any]:
        slots = kwargs["img_mask"][0].bool()  # samples share the layout (the transformer reads row 0)
        per_slot, rest = divmod(layout.n, int(slots.sum()))
        if rest or per_slot < 1:
            raise ValueError(f"img_mask marks {int(slots.sum())} image slots for {layout.n} image tokens")
        is_image = torch.repeat_interleave(slots, torch.where(slots, per_slot, 1))  # over the joint sequence
        image_pos = torch.nonzero(is_image).squeeze(1)  # joint position of each image token, in order
        keep = ~is_image
        keep[image_pos[index.to(image_pos.device)]] = True
        joint = torch.nonzero(keep).squeeze(1)
        image_ids, target = self.metadata(is_image, list(kwargs["img_shapes"][0]))
        prefix = int((~target[joint]).sum())
        state.call = Qwen21Call(joint, is_image.numel(), prefix, image_ids[joint],
                                kwargs.get("kv_cache_mode") == "cached")
        return dict(kwargs)

    def scatter(self, output: Any, index: Tensor, layout: RefLayout) -> Any:
        """The joint output scattered back to its dense length; a cached call's output (the target alone) as is."""
        call = self.state.call
        if call.cached:
            return output
        sample = output_sample(output)
        dense = sample.new_zeros(sample.shape[0], call.n, *sample.shape[2:])
        dense[:, call.index.to(sample.device)] = sample
        return with_sample(output, dense)

    def attach(self, transformer: torch.nn.Module, state: Any) -> list[Any]:
        self.metadata, self.state = transformer.build_token_metadata, state
        blocks = KeptBlockInputs(state)
        handles = [b.register_forward_pre_hook(blocks, with_kwargs=True) for b in transformer.transformer_blocks]
        return handles + [transformer.norm_out.register_forward_pre_hook(KeptNormInputs(state), with_kwargs=True)]


def _rows(x: Tensor, index: Tensor, dim: int) -> Tensor:
    return x.index_select(dim, index.to(x.device))


class KeptBlockInputs:
    """Pre-hook on every ``QwenImage21TransformerBlock``: its per-token arguments over the kept tokens only."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = self.state.replay.current(self.state.call, module, args, kwargs)  # its forward's, when recomputed
        if not isinstance(call, Qwen21Call):
            return None
        kw = as_keywords(module, args, kwargs)
        mask = kw.get("attention_mask")
        if call.cached:
            cache = kw.get("layer_cache")
            held = None if cache is None or cache.k is None else cache.k.shape[1]
            if held is not None and held != call.prefix:
                raise ValueError(f"the K/V cache holds {held} prefix tokens but this call's Sparse Context selection "
                                 f"keeps {call.prefix}: the cache was filled by a call with another selection")
            if isinstance(mask, Tensor) and mask.shape[-1] == call.n:  # the text padding over [prefix, target]
                kw["attention_mask"] = call.thin("attention_mask", mask, lambda m: _rows(m, call.index, -1))
        else:
            if kw["hidden_states"].shape[1] == call.n:  # the first block: later ones get the kept tokens already
                kw["hidden_states"] = _rows(kw["hidden_states"], call.index, 1)
            for name, dim in (("rotary_emb", 0), ("target_token_mask", 0), ("key_valid", 1)):
                if isinstance(kw.get(name), Tensor):
                    kw[name] = call.thin(name, kw[name], lambda x, d=dim: _rows(x, call.index, d))
            if kw.get("segments") is not None:
                kw["segments"] = call.thin("segments", kw["segments"], lambda s: call.segments())
            if kw.get("cache_write_slice") is not None:
                kw["cache_write_slice"] = slice(0, call.prefix)
            if type(mask).__name__ == "BlockMask":  # the flex processors' block-causal mask
                kw["attention_mask"] = call.thin("attention_mask", mask, lambda m: _block_mask(call, kw))
            elif isinstance(mask, Tensor) and mask.shape[-1] == call.n:
                kw["attention_mask"] = call.thin("attention_mask", mask, lambda m: _rows(m, call.index, -1))
        return tuple(kw.pop(name) for name in positional_names(module, len(args))), kw


def _block_mask(call: Qwen21Call, kw: dict[str, Any]) -> Any:
    """The block-causal ``BlockMask`` of the kept tokens (built by diffusers' own function)."""
    from diffusers.models.transformers.transformer_qwenimage21 import build_qwenimage21_block_causal_mask

    hs = kw["hidden_states"]
    return build_qwenimage21_block_causal_mask(call.image_ids.to(hs.device), kw.get("key_valid"), hs.shape[0],
                                               hs.device)


class KeptNormInputs:
    """Pre-hook on ``norm_out``: the target mask (which modulation row each token reads) of the kept tokens."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = self.state.call
        if not isinstance(call, Qwen21Call) or call.cached:
            return None
        kw = as_keywords(module, args, kwargs)
        mask = kw.get("target_token_mask")
        if not isinstance(mask, Tensor) or mask.shape[0] != call.n:
            return None
        kw["target_token_mask"] = call.thin("target_token_mask", mask, lambda m: _rows(m, call.index, 0))
        return tuple(kw.pop(name) for name in positional_names(module, len(args))), kw
