"""Checks of proportional Sparse Context (``SparseContextConfig(proportional=True)``) shared by the FLUX.2 and
FLUX.1 Kontext tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tokensparse.context import SparseContextConfig
from tokensparse.integrations.diffusers import (
    apply_sparse_context_diffusers,
    remove_sparse_context_diffusers,
    sparse_context_state,
)


def copies_of_kept(ids: Tensor, index: Tensor, refs: tuple[int, ...], seed: int = 1) -> Tensor:
    """``owner (N,)``: every dropped reference token (T id in ``refs``, not in ``index``) copies a random kept
    token of its reference; every other token is its own."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.arange(ids.shape[0])
    for t in refs:
        ref = torch.nonzero(ids[:, 0] == t).squeeze(1)
        kept, dropped = ref[torch.isin(ref, index)], ref[~torch.isin(ref, index)]
        owner[dropped] = kept[torch.randint(len(kept), (len(dropped),), generator=g)]
    return owner


def assert_bias_is_duplication(tr, kw: dict, ids: Tensor, refs: tuple[int, ...]) -> None:
    """Proportional Sparse Context on ``tr`` equals the unhooked ``tr`` fed each kept token ``size`` times at its
    position (its stand-ins made copies of it, so the nearest-kept assignment is known), and plain Sparse Context
    does not."""
    cfg = dict(keep=0.25, selector="random", seed=1)  # random: the kept positions do not depend on the values
    apply_sparse_context_diffusers(tr, SparseContextConfig(**cfg, proportional=True))
    index = torch.nonzero(tr(**kw)[0][0].abs().sum(-1) != 0).squeeze(1)
    owner = copies_of_kept(ids, index, refs)
    call = dict(kw, hidden_states=kw["hidden_states"][:, owner])
    biased = tr(**call)[0]  # new references: a new selection (the same positions), sizes from the copies
    (sizes, bias), = sparse_context_state(tr).sizes.values()
    counts = torch.bincount(owner, minlength=ids.shape[0]).float()
    assert torch.equal(sizes, counts) and int(counts.max()) > 1
    assert torch.equal(bias, counts[index].log())
    apply_sparse_context_diffusers(tr, SparseContextConfig(**cfg))
    plain = tr(**call)[0]
    remove_sparse_context_diffusers(tr)
    rep = torch.repeat_interleave(index, counts[index].long())  # each kept token, size times, in order
    dup_ids = ids[rep] if kw["img_ids"].dim() == 2 else kw["img_ids"][:, rep]
    dup = tr(**dict(kw, hidden_states=kw["hidden_states"][:, rep], img_ids=dup_ids))[0]
    first = torch.cumsum(counts[index].long(), 0) - counts[index].long()  # each kept token's first copy
    torch.testing.assert_close(biased[:, index], dup[:, first], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain[:, index], dup[:, first], rtol=1e-3, atol=1e-3)  # the bias is what matches
    assert biased.shape[:2] == kw["hidden_states"].shape[:2]  # the dense sequence (a Fill model: fewer channels out)


class MaskRecorder:
    """The ``attention_mask`` every block's attention receives (double- and single-stream), and how many keys
    that attention has (its text plus image tokens)."""

    def __init__(self, transformer) -> None:
        self.masks: list[Tensor | None] = []
        self.keys: list[int] = []
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        self.handles = [b.attn.register_forward_pre_hook(self._record, with_kwargs=True) for b in blocks]
        self.blocks = len(blocks)

    def clear(self) -> None:
        self.masks.clear()
        self.keys.clear()

    def _record(self, module, args: tuple, kwargs: dict) -> None:
        self.masks.append(kwargs.get("attention_mask"))
        context = kwargs.get("encoder_hidden_states")
        self.keys.append(kwargs["hidden_states"].shape[1] + (0 if context is None else context.shape[1]))


def keep_one_then_plain_sparse(pipe: Any, run: Callable[[Any], np.ndarray]
                               ) -> tuple[MaskRecorder, np.ndarray, np.ndarray]:
    """Check that ``proportional=True`` at ``keep=1`` is the dense output with no mask passed; returns a cleared
    recorder of the attention masks, the dense output and the plain (unbiased) ``keep=0.25`` output, with
    ``keep=0.25, proportional=True`` applied for the caller's next ``run``."""
    dense = run(pipe)
    rec = MaskRecorder(pipe.transformer)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=1.0, proportional=True))
    assert np.array_equal(run(pipe), dense) and set(map(type, rec.masks)) == {type(None)}
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    plain = run(pipe)
    rec.clear()
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, proportional=True))
    return rec, dense, plain
