"""A :class:`Matching`: one merge plan as index tensors, and merging / unmerging a batch of tokens with it (one
``index_add`` or ``index_select`` over the flattened batch). Pure tensor code: how a plan is found is in
:mod:`.bipartite`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class Matching:
    """One merge plan for a batch of ``N``-token sequences (all index tensors int64, on the tokens' device).

    keep: ``(B, M)`` original positions of the tokens that survive (destinations and unmerged sources), ascending.
    src: ``(B, r)`` original positions of the merged sources.
    slot: ``(B, r)`` position in the merged sequence of each merged source's destination.
    index: ``(B, N)`` position in the merged sequence of every original token (what unmerge gathers).
    counts: ``(B, M)`` how many original tokens each merged token stands for (float, >= 1).
    """

    keep: Tensor
    src: Tensor
    slot: Tensor
    index: Tensor
    counts: Tensor

    # sizes kept once read (the tensors never change): the hooks read them several times per sublayer call
    @cached_property
    def batch_size(self) -> int:
        return self.index.shape[0]

    @cached_property
    def num_tokens(self) -> int:
        return self.index.shape[1]

    @cached_property
    def num_kept(self) -> int:
        return self.keep.shape[1]

    @cached_property
    def num_merged(self) -> int:
        return self.src.shape[1]

    @property
    def is_inference(self) -> bool:
        """Whether any of its index tensors (or their flattened forms, once made) was made under
        ``torch.inference_mode()``: autograd cannot save those for backward, so such a matching is never reused
        where autograd records (see :meth:`MatchCache.lookup`)."""
        made = [self.keep, self.src, self.slot, self.index, self.counts]
        made += [self.__dict__[k] for k in ("_flat_index", "_flat_keep", "_counts_column") if k in self.__dict__]
        return any(t.is_inference() for t in made)

    def fits(self, x: Tensor) -> bool:
        """Whether ``x`` ``(B, N, ...)`` has the batch size, length and device this matching was made for."""
        return (x.shape[0] == self.batch_size and x.shape[1] == self.num_tokens
                and x.device == self.index.device)

    def expand(self, batch: int) -> Matching:
        """This batch-1 matching shared by ``batch`` samples (e.g. where positions must be the same for all)."""
        if self.batch_size != 1:
            raise ValueError(f"only a batch-1 matching can be expanded, this one has batch {self.batch_size}")
        return Matching(*(t.expand(batch, *t.shape[1:]) for t in (self.keep, self.src, self.slot, self.index,
                                                                   self.counts)))

    @cached_property
    def _flat_index(self) -> Tensor:
        """``index`` as rows of the flattened ``(B*M, C)`` merged batch, ``(B*N,)``: one index_select/index_add.
        A batch of one needs no row offsets: its ``index`` itself (a view, no ops; the usual case at inference)."""
        if self.batch_size == 1:
            return self.index.reshape(-1)
        offsets = torch.arange(self.batch_size, device=self.index.device)[:, None] * self.num_kept
        return (self.index + offsets).reshape(-1)

    @cached_property
    def _flat_keep(self) -> Tensor:
        """``keep`` as rows of the flattened ``(B*N, C)`` input batch, ``(B*M,)`` (batch one: ``keep`` itself)."""
        if self.batch_size == 1:
            return self.keep.reshape(-1)
        offsets = torch.arange(self.batch_size, device=self.keep.device)[:, None] * self.num_tokens
        return (self.keep + offsets).reshape(-1)

    @cached_property
    def _counts_column(self) -> Tensor:
        """``counts`` as a column ``(B*M, 1)`` of the flattened merged batch, what a mean merge divides by."""
        return self.counts.reshape(-1, 1)

    def merge(self, x: Tensor, mode: str = "mean", size: Tensor | None = None) -> Tensor:
        """``(B, N, ...)`` -> ``(B, M, ...)``.

        mode ``"mean"``: each kept token becomes the average of itself and the sources merged into it,
        weighted by ``size`` ``(B, N)`` (how many tokens each input token already stands for; default 1).
        mode ``"keep"``: drop merged sources, keep the destination's value (positions, RoPE tables).
        One ``index_add`` (or ``index_select``) over the flattened batch: ~10x faster on CPU than
        per-row gather/scatter, which matters because merging pays only if it costs less than it saves.
        ``ValueError`` for an ``x`` (or ``size``) whose batch or length is not this matching's (it would be read
        as other rows), ``TypeError`` for an ``x`` that is not floating point with ``mode="mean"``.
        """
        if mode not in ("mean", "keep"):
            raise ValueError(f"mode must be 'mean' or 'keep', got {mode!r}")
        self._check("x", x, self.num_tokens, "N")
        if mode == "mean" and not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"merging with mode='mean' averages tokens: x must be floating point, got {x.dtype} "
                            "(mode='keep' takes any dtype)")
        if size is not None:
            self._check("size", size, self.num_tokens, "N", exact=True)
        if self.num_merged == 0:
            return x
        b, n, m = self.batch_size, self.num_tokens, self.num_kept
        flat = x.reshape(b * n, -1)
        if mode == "keep":
            return flat.index_select(0, self._flat_keep).reshape(b, m, *x.shape[2:])
        out = flat.new_zeros(b * m, flat.shape[1])
        if size is None:
            counts = self._counts_column
            if counts.dtype != out.dtype:
                counts = counts.to(out.dtype)
            out.index_add_(0, self._flat_index, flat).div_(counts)
        else:
            w = size.reshape(b * n, 1).to(flat.dtype)
            out.index_add_(0, self._flat_index, flat * w).div_(self.merge_size(size).reshape(-1, 1).to(out.dtype))
        return out.reshape(b, m, *x.shape[2:])

    def merge_size(self, size: Tensor | None = None) -> Tensor:
        """Sizes ``(B, M)`` of the merged tokens, given the input tokens' sizes ``(B, N)`` (default 1)."""
        if size is None:
            return self.counts
        self._check("size", size, self.num_tokens, "N", exact=True)
        flat = size.reshape(-1)
        out = flat.new_zeros(self.batch_size * self.num_kept).index_add_(0, self._flat_index, flat)
        return out.reshape(self.batch_size, self.num_kept)

    def unmerge(self, y: Tensor) -> Tensor:
        """``(B, M, ...)`` -> ``(B, N, ...)``: every original token gets its merged token's value (``ValueError`` for a
        ``y`` whose batch or length is not this matching's merged one)."""
        self._check("y", y, self.num_kept, "M")
        if self.num_merged == 0:
            return y
        flat = y.reshape(self.batch_size * self.num_kept, -1)
        return flat.index_select(0, self._flat_index).reshape(self.batch_size, self.num_tokens, *y.shape[2:])

    def _check(self, name: str, x: object, n: int, axis: str, exact: bool = False) -> None:
        """``x`` must be a tensor ``(B, n, ...)`` (``exact``: ``(B, n)``) of this matching's batch: a reshape of the
        flattened batch would otherwise read another shape with as many elements as other rows, silently."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        shape = tuple(x.shape)
        if len(shape) < 2 or shape[:2] != (self.batch_size, n) or (exact and len(shape) != 2):
            want = f"({self.batch_size}, {n}{'' if exact else ', ...'})"
            raise ValueError(f"{name} must be (B, {axis}{'' if exact else ', ...'}) = {want} for this matching "
                             f"(batch {self.batch_size}, {self.num_tokens} tokens -> {self.num_kept}), got {shape}")


def concat_matchings(parts: Sequence[Matching]) -> Matching:
    """One matching of consecutive runs of tokens, each merged by its own matching of ``parts`` and never with another
    run's tokens (e.g. the frames of a layered target, each on its own grid): the runs' positions and slots offset by
    the tokens and kept tokens of the runs before them. ``ValueError`` for no parts or parts of different batch sizes.
    """
    if not parts:
        raise ValueError("concat_matchings needs at least one matching")
    if len({m.batch_size for m in parts}) != 1:
        raise ValueError(f"the matchings must have one batch size, got {[m.batch_size for m in parts]}")
    if len(parts) == 1:
        return parts[0]
    keep, src, slot, index = [], [], [], []
    tokens = kept = 0
    for m in parts:
        keep.append(m.keep + tokens)
        src.append(m.src + tokens)
        slot.append(m.slot + kept)
        index.append(m.index + kept)
        tokens, kept = tokens + m.num_tokens, kept + m.num_kept
    return Matching(keep=torch.cat(keep, 1), src=torch.cat(src, 1), slot=torch.cat(slot, 1),
                    index=torch.cat(index, 1), counts=torch.cat([m.counts for m in parts], 1))
