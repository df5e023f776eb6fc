"""The per-block hooks of token merging: :class:`BlockMerger` puts a forward pre-hook and a forward hook on each
merged sublayer (a :class:`Sublayer`) of one block: the first computes (or, between recompute steps, looks up) the
matching of the block's target grid through the model's :class:`~.merging_core.TokenMergingState`, every one merges
its input's grid tokens before the call and unmerges its output after; :func:`merge_block` builds one for the
sublayers a config selects. No targets here: :mod:`.merging_hooks` and :mod:`.merging_diffusers` wire them."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..merging import Matching
from .fingerprints import _in_backward
from .merging_spans import merge_key_mask, merge_span, part, thin_query_key_mask, unmerge_span

if TYPE_CHECKING:
    from .merging_core import TokenMergingState

logger = logging.getLogger(__name__)

# tokens of a call -> (h, w, start) of its target grid, or (h, w, start, frames): that many h x w grids one after
# another from start (Qwen-Image-Layered's target layers), each merged on its own
GridFn = Callable[[int], "tuple[int, ...] | None"]
RopeFn = Callable[[tuple, dict, Matching, int, "tuple[int, int]"], "tuple[tuple, dict]"]


@dataclass
class Sublayer:
    module: nn.Module
    tokens: str  # name of the token argument: positional index 0 or this keyword
    rope: RopeFn | None = None  # merges the call's positional table along with the tokens
    target_only: bool = False  # RefDiT mlp: only calls with role="target"
    outputs: tuple[int, ...] = (0,)  # which elements of a tuple output are the merged tokens' (unmerged)
    context_first: bool = False  # joint attention over [context, tokens]: a key mask may span both (FLUX)
    context_last: bool = False  # joint attention over [tokens, context]: a key mask may span both (HunyuanImage)
    # keys [prefix, tokens], the prefix's K/V cached outside the call (Qwen-Image 2.1's cached steps): a key mask
    # longer than the tokens spans both, the prefix first
    key_prefix: bool = False
    # self-attention called with its tokens passed again as encoder_hidden_states (Lumina 2): merged along
    self_context: bool = False
    # called again in the block on other tokens (CogView4's ff, on the text stream next): only its first call in
    # each call of the block merges (BlockMerger's block= marks where a block call starts)
    first_call: bool = False
    # the block's attribute holding ``module`` (a dotted path for a submodule's: "ff.conv_point"), where something
    # may replace it (peft's LoRA wraps a ``Linear`` or ``Conv2d``, unloading it puts the base back): the hooks move
    # to the module there at each block call (needs block=)
    attr: str | None = None
    # a pointwise (1x1) convolution over the token grid as a (B, C, H, W) map (Sana's mix-FFN): its input read as the
    # grid's H * W tokens (row-major), the merged ones passed as a (B, C, N', 1) column, its output unmerged back
    channels_first: bool = False
    # called on [other tokens, the grid] (CogView3-Plus's ff over [text, image]): the grid is its input's last tokens,
    # wherever the block's first sublayer found it
    at_end: bool = False
    # called on (N, B, C) tokens, the sequence first (ERNIE-Image's mlp): read and merged along dim 0
    seq_first: bool = False


class BlockMerger:
    """Hooks on the sublayers of one block; the first merged sublayer owns the matching lookup."""

    def __init__(self, state: TokenMergingState, name: str, sublayers: list[Sublayer],
                 grid: GridFn, shared: bool = False, block: nn.Module | None = None) -> None:
        self.state, self.name, self.grid, self.shared = state, name, grid, shared
        self.current: Matching | None = None
        self.span = (0, 0)  # (start, length) of the target grid in the sublayer's input: the tokens merged
        self.called: set[int] = set()  # first_call sublayers called in this block call
        self.sublayers = sublayers
        if block is None and any(sub.first_call or sub.attr for sub in sublayers):
            raise ValueError(f"{name}: a first_call or attr sublayer needs its block (block=), whose calls reset it")
        if block is not None:  # first_call sublayers: each block call starts afresh; attr ones: moved if replaced
            state.handles.append(block.register_forward_pre_hook(functools.partial(BlockMerger._start, self)))
        # per sublayer, its hooks' handles (also in state.handles, which removing the merging removes)
        self.hooks = [self._hook(sub, i == 0) for i, sub in enumerate(sublayers)]

    def _hook(self, sub: Sublayer, owner: bool) -> list[Any]:
        """Hook ``sub.module``; its handles. Partials of methods, not closures: copy.deepcopy copies them along."""
        self.state.sublayers.extend(sub.module.modules())
        pre, post = functools.partial(self._pre, sub, owner), functools.partial(self._post, sub)
        handles = [sub.module.register_forward_pre_hook(pre, with_kwargs=True),
                   sub.module.register_forward_hook(post, with_kwargs=True)]
        self.state.handles.extend(handles)
        return handles

    def _start(self, module: nn.Module, args: tuple) -> None:
        self.called = set()
        for i, sub in enumerate(self.sublayers):
            now = _submodule(module, sub.attr) if sub.attr else None
            if isinstance(now, nn.Module) and now is not sub.module:  # replaced since wired (a LoRA added, unloaded)
                for handle in self.hooks[i]:
                    handle.remove()
                    self.state.handles.remove(handle)
                sub.module = now
                self.hooks[i] = self._hook(sub, i == 0)

    def _pre(self, sub: Sublayer, owner: bool, module: nn.Module, args: tuple, kwargs: dict
             ) -> tuple[tuple, dict] | None:
        module.__dict__["_tokensparse_active"] = None
        module.__dict__.pop("_tokensparse_hw", None)
        if not self.state.running and not _in_backward():  # called by another model sharing it (a ControlNet)
            return None
        if sub.target_only and kwargs.get("role", "target") != "target":
            return None
        if sub.first_call:
            if id(sub) in self.called:  # a later call in the block (CogView4's ff on the text stream): never merged
                return None
            self.called.add(id(sub))
        from_kwargs = not args
        x = kwargs[sub.tokens] if from_kwargs else args[0]
        hw = None
        if sub.channels_first:
            if not isinstance(x, Tensor) or x.dim() != 4:
                return None
            hw, x = tuple(x.shape[-2:]), x.flatten(2).transpose(1, 2)
        if sub.seq_first:
            if not isinstance(x, Tensor) or x.dim() != 3:
                return None
            x = x.transpose(0, 1)
        if owner:
            grid = self.grid(x.shape[1])
            self.state.grids_found += grid is not None and min(grid[:2]) >= 2  # 1 x n: no 2x2 cell to merge in
            self.current = None
            if grid is not None:
                frames = grid[3] if len(grid) > 3 else 1
                self.span = (grid[2], frames * grid[0] * grid[1])
                self.current = self.state.matching(self.name, part(x, self.span), grid[:2], self.shared, frames)
        m, span = self.current, self.span
        if m is None or m.num_merged == 0:
            return None
        if sub.at_end:
            span = (max(x.shape[1] - span[1], 0), span[1])
        if not m.fits(part(x, span)):  # e.g. diffusers' forward chunking calls ff on slices of the tokens
            if not self.state.warned_misfit:
                self.state.warned_misfit = True
                logger.warning("tokensparse: token merging: %s of %s got %d tokens where the block's grid has %d "
                               "(feed-forward chunking, enable_forward_chunking?); it runs unmerged",
                               type(module).__name__, self.name, x.shape[1], span[1])
            return None
        context = kwargs.get("encoder_hidden_states")
        self_context = sub.self_context and context is x
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() >= 2:
            mask = self._merged_mask(module, mask, m, span, x.shape[1], None if self_context else context,
                                     sub.context_first, sub.context_last, sub.key_prefix)
            if mask is None:
                return None
            kwargs = {**kwargs, "attention_mask": mask}
        module.__dict__["_tokensparse_active"] = (m, span)
        if hw is not None:  # a pointwise convolution: its output goes back onto this grid
            module.__dict__["_tokensparse_hw"] = hw
        merged = merge_span(m, x, span)
        if hw is not None:
            merged = merged.transpose(1, 2).unsqueeze(-1)
        if sub.seq_first:
            merged = merged.transpose(0, 1)
        if from_kwargs:
            kwargs = {**kwargs, sub.tokens: merged}
        else:
            args = (merged, *args[1:])
        if self_context:
            kwargs = {**kwargs, "encoder_hidden_states": merged}
        if sub.rope is not None:
            args, kwargs = sub.rope(args, kwargs, m, x.shape[1], span)
        return args, kwargs

    def _merged_mask(self, module: nn.Module, mask: Tensor, m: Matching, span: tuple[int, int], n: int,
                     context: Any, context_first: bool = False, context_last: bool = False,
                     key_prefix: bool = False) -> Tensor | None:
        """The sublayer's ``attention_mask`` for the merged tokens, or ``None`` (run it unmerged).

        A self-attention key mask over these ``n`` tokens keeps the entries of the surviving tokens
        (:func:`merge_key_mask`); a cross-attention mask (over ``context``) is unchanged; with ``context_first``
        (FLUX double-stream attention: keys ``[context, tokens]``, e.g. proportional Sparse Context's bias), or with
        ``context_last`` (HunyuanImage: keys ``[tokens, context]``), a key mask over both keeps the context's entries
        and the surviving tokens'; with ``key_prefix`` (Qwen-Image 2.1's cached steps: keys ``[cached prefix,
        tokens]``) a key mask longer than the tokens keeps the prefix's entries and the surviving tokens'. A query x
        key mask over the same tokens (Chroma's ``(B, 1, L, L)``) keeps the surviving tokens' rows and columns
        (:func:`~.merging_spans.thin_query_key_mask`: a slice where every token of the span has the same row and
        column, checked once per model call for the mask its blocks share). Any other mask -- over context + tokens
        in another order (SD3 joint attention), a merge across the mask -- runs that sublayer unmerged, with a
        one-time warning."""
        n_ctx = context.shape[1] if isinstance(context, Tensor) and context.dim() == 3 else 0
        if n_ctx and mask.shape[-1] == n_ctx:
            return mask  # cross-attention: its keys are the context's, which merging leaves alone
        if n_ctx and context_first and mask.shape[-1] == n_ctx + n:
            span, n = (n_ctx + span[0], span[1]), n_ctx + n
        elif n_ctx and context_last and mask.shape[-1] == n + n_ctx:
            n = n + n_ctx
        elif key_prefix and mask.shape[-1] > n:
            span, n = (span[0] + mask.shape[-1] - n, span[1]), mask.shape[-1]
        merged = merge_key_mask(mask, m, span, n)
        if merged is None and mask.dim() >= 3 and mask.shape[-2] == n:
            memo = self.state.square_masks if self.state.running and not _in_backward() else None
            merged = thin_query_key_mask(mask, m, span, n, memo)
        if merged is not None:
            return merged
        if not self.state.warned_mask:
            self.state.warned_mask = True
            logger.warning("tokensparse: token merging: %s of %s got an attention_mask of shape %s that it cannot "
                           "thin with the tokens (%d tokens, %d context); it runs unmerged", type(module).__name__,
                           self.name, tuple(mask.shape), n, n_ctx)
        return None

    def _post(self, sub: Sublayer, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        active = module.__dict__.pop("_tokensparse_active", None)
        if active is None:
            return None
        m, span = active
        hw = module.__dict__.pop("_tokensparse_hw", None)
        if hw is not None:  # a pointwise convolution: (B, C, N', 1) -> tokens, unmerged, -> (B, C, H, W)
            return unmerge_span(m, output.squeeze(-1).transpose(1, 2), span).transpose(1, 2).unflatten(2, hw)
        if sub.seq_first:
            return unmerge_span(m, output.transpose(0, 1), span).transpose(0, 1)
        if isinstance(output, tuple):
            return tuple(unmerge_span(m, o, span) if i in sub.outputs else o for i, o in enumerate(output))
        return unmerge_span(m, output, span)


def active_merge(module: nn.Module) -> tuple[Matching, tuple[int, int]] | None:
    """The matching and the ``(start, length)`` span that token merging merged ``module``'s current call's tokens by
    (while the call runs), or ``None`` where it merged none: for code inside the call that holds per-token tables of
    its own (Sparse Context's per-row RoPE on OmniGen)."""
    return module.__dict__.get("_tokensparse_active")


def _submodule(block: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path`` (``"proj_mlp"``, ``"ff.conv_point"``) in ``block``, or ``None`` where there is none."""
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def merge_block(state: TokenMergingState, name: str, attn: Sublayer | None, mlp: Sublayer | None, grid: GridFn,
                **kwargs: Any) -> BlockMerger | None:
    """A :class:`BlockMerger` over a block's attention and MLP sublayers, those ``state.cfg`` selects (``merge_attn``
    / ``merge_mlp``; ``None``: the block has no such sublayer), in that order; ``None`` when it selects neither."""
    subs = [sub for sub, on in ((attn, state.cfg.merge_attn), (mlp, state.cfg.merge_mlp)) if on and sub is not None]
    return BlockMerger(state, name, subs, grid, **kwargs) if subs else None


def whole_grid(box: dict, n: int) -> tuple[int, int, int] | None:
    """A grid function (``functools.partial(whole_grid, box)``) for sublayers whose input is the image grid alone:
    all ``n`` tokens when ``box["grid"] = (h, w)`` holds ``h * w == n`` of them (CogView4's image stream, Sana,
    HunyuanDiT), else ``None`` (nothing merged)."""
    g = box["grid"]
    return None if g is None or g[0] * g[1] != n else (g[0], g[1], 0)


def leading_grid(box: dict, n: int) -> tuple[int, int, int] | None:
    """A grid function (``functools.partial(leading_grid, box)``) for sublayers whose input starts with the image grid
    (other tokens, if any, follow it: references, padding, text): its first ``h * w`` of the ``n`` tokens when
    ``box["grid"] = (h, w)`` has no more than ``n`` of them (Qwen-Image, Z-Image, HiDream-I1, HunyuanImage 2.1), else
    ``None`` (nothing merged)."""
    g = box["grid"]
    return None if g is None or g[0] * g[1] > n else (g[0], g[1], 0)


def trailing_grid(box: dict, n: int) -> tuple[int, int, int] | None:
    """A grid function (``functools.partial(trailing_grid, box)``) for sublayers whose input ends with the image grid
    (other tokens, if any, before it: text, references, a time token): its last ``h * w`` of the ``n`` tokens when
    ``box["grid"] = (h, w)`` has no more than ``n`` of them (Qwen-Image 2.1, OmniGen, CogView3-Plus's ``ff`` over
    ``[text, image]``, Krea 2), else ``None`` (nothing merged)."""
    g = box["grid"]
    return None if g is None or g[0] * g[1] > n else (g[0], g[1], n - g[0] * g[1])


def row_major_grid(img: Tensor) -> tuple[int, int] | None:
    """``(h, w)`` where the position ids ``img (..., n, 3)`` are a row-major ``h x w`` grid's ``(0, row, column)``
    coordinates from 0, alike along every leading axis (the image rows of Krea 2's or Ideogram 4's ``position_ids``),
    else ``None``."""
    n = img.shape[-2]
    w = int(img[..., 2].max().item()) + 1 if n else 0
    if w < 1 or n % w:
        return None
    h = n // w
    rows = torch.arange(h, device=img.device).repeat_interleave(w)
    cols = torch.arange(w, device=img.device).repeat(h)
    want = torch.stack([torch.zeros_like(rows), rows, cols], dim=1)
    return (h, w) if torch.equal(img, want.to(img.dtype).expand_as(img)) else None
