"""Thinning a query x key mask with the tokens a merge leaves (``merging_spans``): a uniform span -- every token of it
with the same row and column, as OmniGen's target and Chroma's image tokens -- by slicing, checked once per mask
(:class:`SquareMasks`), bit for bit what the exact per-pair path gives; any other mask by that path."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch
from torch import Tensor

from tokensparse.integrations import merging_spans
from tokensparse.integrations.merging_spans import (
    SquareMasks,
    merge_query_key_mask,
    span_is_uniform,
    thin_query_key_mask,
    thin_uniform,
)
from tokensparse.merging import Matching, match

N = 24


def _matching(batch: int, length: int, num: int, seed: int = 0) -> Matching:
    x = torch.randn(batch, length, 8, generator=torch.Generator().manual_seed(seed))
    return match(x, torch.arange(length) % 3 == 0, num=num)


def _omnigen_like(batch: int, span: tuple[int, int], n: int = N) -> Tensor:
    """An additive ``(B, 1, n, n)`` mask, OmniGen's way: causal outside the span, left padding per sample; the span's
    tokens see every unpadded token, and nothing outside the span sees them."""
    start, length = span
    inside = torch.zeros(n, dtype=torch.bool)
    inside[start:start + length] = True
    sees = torch.tril(torch.ones(n, n, dtype=torch.bool)) & ~inside[None, :]
    sees[inside] = True
    pad = torch.arange(n)[None] < torch.arange(batch)[:, None] * 2 + (start == 0) * length  # sample i: 2i, first
    real = ~pad | inside  # ... after the span where it leads
    allowed = sees[None] & real[:, None, :]
    return ((~allowed).float() * torch.finfo(torch.float32).min).unsqueeze(1)


@pytest.mark.parametrize("span", [(10, 14), (4, 12), (0, 16)], ids=["trailing", "middle", "leading"])
@pytest.mark.parametrize("mask_batch", [1, 2])
def test_uniform_span_thins_as_the_exact_path_bit_for_bit(span, mask_batch) -> None:
    m = _matching(2, span[1], num=span[1] // 2)
    mask = _omnigen_like(mask_batch, span)
    assert span_is_uniform(mask[:, 0], span)
    exact = merge_query_key_mask(mask, m, span, N)
    fast = thin_query_key_mask(mask, m, span, N)
    assert exact is not None and fast.shape == exact.shape == (2, 1, N - span[1] // 2, N - span[1] // 2)
    assert torch.equal(fast, exact)
    assert torch.equal(thin_query_key_mask(mask, m, span, N, SquareMasks()), exact)
    if span[0] + span[1] == N:  # trailing: a view of the mask, no copy
        assert fast.data_ptr() == mask.data_ptr()
    three = mask[:, 0]  # (B, n, n), no head axis
    assert torch.equal(thin_query_key_mask(three, m, span, N), merge_query_key_mask(three, m, span, N))


def test_uniform_thinning_keeps_whichever_tokens_the_matching_keeps() -> None:
    span, mask = (10, 14), _omnigen_like(2, (10, 14))
    a, b = _matching(2, 14, 7, seed=0), _matching(2, 14, 7, seed=1)
    assert not torch.equal(a.keep, b.keep)
    assert torch.equal(merge_query_key_mask(mask, a, span, N), merge_query_key_mask(mask, b, span, N))
    assert torch.equal(thin_uniform(mask, span, N, 7).expand(2, -1, -1, -1), merge_query_key_mask(mask, a, span, N))


def test_non_uniform_mask_takes_the_exact_path() -> None:
    span = (4, 20)
    m = _matching(2, 20, 8)
    # each target token's row and column are those of the token it merges into: thinnable, but not uniform
    key = torch.rand(2, N, generator=torch.Generator().manual_seed(3))
    key[:, 4:] = m.unmerge(m.merge(key[:, 4:], mode="keep"))
    mask = (key[:, None, :, None] * key[:, None, None, :]).contiguous()
    assert not span_is_uniform(mask[:, 0], span)
    exact = merge_query_key_mask(mask, m, span, N)
    assert exact is not None
    memo = SquareMasks()
    assert torch.equal(thin_query_key_mask(mask, m, span, N), exact)
    assert torch.equal(thin_query_key_mask(mask, m, span, N, memo), exact)
    gone = next(j for j in range(20) if j not in m.keep[0].tolist())
    mask[:, :, :, 4 + gone] = -1.0  # a merged token's column unlike its destination's: not thinnable
    assert thin_query_key_mask(mask, m, span, N, memo) is None  # an in-place change: checked again
    assert thin_query_key_mask(torch.ones(2, N), m, span, N, memo) is None  # a key mask: merge_key_mask's job


def test_square_masks_checks_each_mask_once(monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    real = merging_spans.span_is_uniform
    monkeypatch.setattr(merging_spans, "span_is_uniform", lambda sq, span: calls.append(span) or real(sq, span))
    span, m = (4, 12), _matching(2, 12, 6)
    mask, memo = _omnigen_like(2, span), SquareMasks()
    first = thin_query_key_mask(mask, m, span, N, memo)
    for _ in range(3):  # the model call's other blocks: the same mask, checked and gathered once
        assert thin_query_key_mask(mask, m, span, N, memo).data_ptr() == first.data_ptr()
    assert len(calls) == 1
    other = mask.clone()
    assert torch.equal(thin_query_key_mask(other, m, span, N, memo), first) and len(calls) == 2  # another mask
    mask.mul_(1)  # in place: its version moves on
    thin_query_key_mask(mask, m, span, N, memo)
    assert len(calls) == 3
    del other, first, mask
    gc.collect()
    assert memo._ref is None and not memo._thinned  # the mask freed: its gathered thinning dropped with it
    thin_query_key_mask(_omnigen_like(2, span), m, span, N, memo)
    copied, loaded = copy.deepcopy(memo), pickle.loads(pickle.dumps(memo))
    assert copied._ref is None and loaded._ref is None and not copied._thinned and not loaded._thinned
    memo.clear()
    assert memo._ref is None and not memo._thinned


def test_square_masks_under_inference_mode() -> None:
    span, m = (10, 14), _matching(2, 14, 7)
    memo = SquareMasks()
    with torch.inference_mode():
        mask = _omnigen_like(2, span)
        exact = merge_query_key_mask(mask, m, span, N)
        assert torch.equal(thin_query_key_mask(mask, m, span, N, memo), exact)
        assert torch.equal(thin_query_key_mask(mask, m, span, N, memo), exact)


def test_thin_uniform_refuses_a_span_past_the_tokens() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        thin_uniform(torch.zeros(1, N, N), (10, 20), N, 5)
    with pytest.raises(ValueError, match="do not fit"):
        thin_uniform(torch.zeros(1, N, N), (10, 14), N, 15)
