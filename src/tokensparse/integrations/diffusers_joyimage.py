"""Where JoyImage Edit's transformers keep their reference tokens, and how to subset them (model knowledge; the
adapters are registered in :mod:`.diffusers_models`).

Both transformers run one token sequence ``[noisy target, reference 1, ...]`` through double-stream blocks and place
each token by 3D RoPE ``(frame, row, column)`` that the transformer computes inside its forward, from shapes:

- ``JoyImageEditTransformer3DModel`` (``JoyImageEditPipeline``, one reference): ``hidden_states (B, n, C, T, H, W)``
  holds the items, references first and the target last. The forward moves the target first, stacks the items as
  frames ``(B, C, n T, H, W)``, patchifies them with its ``img_in`` convolution and builds RoPE over the
  ``(n T / pt, H / ph, W / pw)`` grid (``get_rotary_pos_embed``), so item ``i`` sits at frames ``i T ...``.
- ``JoyImageEditPlusTransformer3DModel`` (``JoyImageEditPlusPipeline``, several references of any size):
  ``hidden_states (B, N, C, pt, ph, pw)`` are already patches and ``shape_list[b]`` lists each item's patch grid
  ``(t, h, w)``, target first; RoPE rows come item by item, each item's frames after the previous item's
  (``_get_rotary_pos_embed_for_range``). With ``encoder_hidden_states_mask`` it builds a boolean key mask over the
  first ``sum(t h w)`` patches and the text.

Neither takes positions from outside, so the thinned call feeds the kept tokens through shapes that make the
transformer build exactly ``K`` tokens, and a pre-hook on every block (:class:`JoyImageRopeHook`) swaps in the dense
RoPE rows of the kept tokens.
"""

from __future__ import annotations

from math import prod
from typing import Any

import torch
from torch import Tensor

from .diffusers_layout import InContextAdapter, RefLayout, output_sample, with_sample


class JoyImageRopeHook:
    """Pre-hook on every JoyImage double-stream block: during a thinned call it hands the block the RoPE of the kept
    tokens (``state.call``, set by the adapter's ``subset``) instead of what the transformer computed from the
    thinned input's shapes."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        rope = self.state.replay.current(self.state.call, module, args, kwargs)  # its forward's, when recomputed
        if rope is None:
            return None
        if len(args) > 3:  # gradient checkpointing calls the block positionally: (img, txt, temb, rope, ...)
            return (*args[:3], rope, *args[4:]), kwargs
        return args, {**kwargs, "image_rotary_emb": rope}


class _JoyImageAdapter(InContextAdapter):
    """What both JoyImage adapters share: the transformer and its patch size (read at attach), a
    :class:`JoyImageRopeHook` on every block, no K/V cache."""

    transformer: Any = None
    patch: tuple[int, int, int] = (1, 2, 2)

    def attach(self, transformer: torch.nn.Module, state: Any) -> list[Any]:
        """Hook ``transformer``'s blocks (returns the handles); remember it and its patch size."""
        self.transformer, self.patch = transformer, tuple(transformer.config.patch_size)
        hook = JoyImageRopeHook(state)
        return [block.register_forward_pre_hook(hook.pre_forward, with_kwargs=True)
                for block in transformer.double_blocks]


def _frames(x: Tensor) -> Tensor:
    """6D latents ``(B, n, C, T, H, W)`` (references, then the target) stacked as the transformer stacks them,
    ``(B, C, n T, H, W)`` with the target first; 5D input as is."""
    if x.dim() == 5:
        return x
    if x.shape[1] > 1:
        x = torch.cat([x[:, -1:], x[:, :-1]], 1)
    b, n, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4, 5).reshape(b, c, n * t, h, w)


class JoyImageAdapter(_JoyImageAdapter):
    """JoyImage Edit: the thinned call passes the kept latent patches side by side as one 5D latent
    ``(B, C, pt, ph, K pw)``, which the transformer's patchify turns into exactly those ``K`` tokens in order; the
    blocks get their dense RoPE rows (with ``rope_type="mrope"`` also the dense text rows, which start after the
    largest image position), and :meth:`scatter` puts the output back into the dense 6D shape."""

    latent: tuple[int, ...] = ()  # (n, C, T, H, W) of the running thinned call's dense input

    def tokens(self, kwargs: dict[str, Any]) -> Tensor:
        """``hidden_states`` as the transformer's token sequence ``(B, N, C pt ph pw)``: each token's latent patch."""
        pt, ph, pw = self.patch
        x = _frames(kwargs["hidden_states"])
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, -1, c * pt * ph * pw)

    def layout(self, kwargs: dict[str, Any]) -> RefLayout | None:
        x = kwargs["hidden_states"]
        if x.dim() != 6 or x.shape[1] < 2:
            return None  # one item: the target alone
        n, _, t, h, w = x.shape[1:]
        if self.patch[0] != 1:
            raise ValueError(f"{type(self.transformer).__name__} takes several items only with patch_size[0] == 1")
        rows, cols = t * (h // self.patch[1]), w // self.patch[2]  # an item's frames stacked as rows
        cells = torch.arange(rows * cols, device=x.device)
        return RefLayout(n * rows * cols, [cells + r * rows * cols for r in range(1, n)], [cells] * (n - 1),
                         [(rows, cols)] * (n - 1))

    def subset(self, kwargs: dict[str, Any], index: Tensor, layout: RefLayout, state: Any) -> dict[str, Any]:
        pt, ph, pw = self.patch
        kept = self.tokens(kwargs).index_select(1, index)
        b, k = kept.shape[:2]
        self.latent = tuple(kwargs["hidden_states"].shape[1:])
        n, c, t, h, w = self.latent
        x = kept.reshape(b, k, c, pt, ph, pw).permute(0, 2, 3, 4, 1, 5).reshape(b, c, pt, ph, k * pw)
        text = kwargs["encoder_hidden_states"].shape[1] if self.transformer.rope_type == "mrope" else None
        (cos, sin), txt = self.transformer.get_rotary_pos_embed([n * t, h // ph, w // pw], text)
        rows = index.to(cos.device)
        state.call = ((cos.index_select(0, rows), sin.index_select(0, rows)), txt)
        return {**kwargs, "hidden_states": x}

    def scatter(self, output: Any, index: Tensor, layout: RefLayout) -> Any:
        """The thinned call's 5D output ``(B, C, pt, ph, K pw)`` as the dense 6D output, dropped tokens zero."""
        sample = output_sample(output)
        pt, ph, pw = self.patch
        n, _, t, h, w = self.latent
        b, c = sample.shape[:2]
        kept = sample.reshape(b, c, pt, ph, index.numel(), pw).permute(0, 4, 1, 2, 3, 5)
        dense = kept.new_zeros(b, layout.n, c, pt, ph, pw)
        dense[:, index] = kept
        x = dense.reshape(b, n * t, h // ph, w // pw, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        x = x.reshape(b, c, n, t, h, w).permute(0, 2, 1, 3, 4, 5)
        return with_sample(output, torch.cat([x[:, 1:], x[:, :1]], 1))  # the target back last


class JoyImageEditPlusAdapter(_JoyImageAdapter):
    """JoyImage Edit Plus: the thinned call passes the kept patches with ``shape_list`` ``[target, (1, 1, K_refs)]``
    per sample (so the transformer builds ``K`` RoPE rows and a padding mask over ``K`` patches), and the blocks get
    the dense RoPE rows of the kept tokens. The batch must share one ``shape_list`` (one selection per batch)."""

    def tokens(self, kwargs: dict[str, Any]) -> Tensor:
        return kwargs["hidden_states"].flatten(2)

    def layout(self, kwargs: dict[str, Any]) -> RefLayout | None:
        shapes = kwargs.get("shape_list")
        if not shapes or len(shapes[0]) < 2:
            return None
        if any(list(s) != list(shapes[0]) for s in shapes):
            raise ValueError("the samples of this batch have references of different sizes or counts (shape_list "
                             "differs), so their tokens sit at different positions; Sparse Context keeps one "
                             "selection per batch: generate them in separate calls")
        sizes = [prod(s) for s in shapes[0]]
        if kwargs["hidden_states"].shape[1] != sum(sizes):
            raise ValueError(f"hidden_states has {kwargs['hidden_states'].shape[1]} patches but shape_list says "
                             f"{sum(sizes)}")
        device = kwargs["hidden_states"].device
        starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
        positions = [torch.arange(starts[r], starts[r + 1], device=device) for r in range(1, len(sizes))]
        cells = [torch.arange(size, device=device) for size in sizes[1:]]
        return RefLayout(sum(sizes), positions, cells, [(t * h, w) for t, h, w in shapes[0][1:]])

    def subset(self, kwargs: dict[str, Any], index: Tensor, layout: RefLayout, state: Any) -> dict[str, Any]:
        hs, shapes = kwargs["hidden_states"], kwargs["shape_list"]
        parts, offset = [], 0
        for t, h, w in shapes[0]:  # the transformer's own rows, item by item
            parts.append(self.transformer._get_rotary_pos_embed_for_range((offset, 0, 0), (offset + t, h, w)))
            offset += t
        rows = index.to(parts[0][0].device)
        state.call = tuple(torch.cat(f).index_select(0, rows).to(hs.device)[None].expand(hs.shape[0], -1, -1)
                           for f in zip(*parts))
        kept_refs = int(index.numel()) - (layout.n - layout.num_ref_tokens)
        return {**kwargs, "hidden_states": hs.index_select(1, index),
                "shape_list": [[s[0], (1, 1, kept_refs)] for s in shapes]}
