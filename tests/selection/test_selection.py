import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensparse.selection import SCORERS, RefView, bayer_rank, count_for_ratio, select, topk_mask


def test_count_for_ratio():
    assert count_for_ratio(64, 0.25) == 16 and count_for_ratio(64, 0.001) == 1 and count_for_ratio(0, 0.5) == 0
    assert count_for_ratio(10, 1.0) == 10


def test_bayer_rank_is_a_spread_permutation():
    r = bayer_rank(4, 4)
    assert sorted((r * 16).round().long().tolist()) == list(range(16))
    first4 = (r * 16).round().long().reshape(4, 4) < 4  # the first quarter: one per 2x2 cell
    assert first4.reshape(2, 2, 2, 2).sum((1, 3)).eq(1).all()


def test_topk_mask_ties_deterministic():
    m = topk_mask(torch.zeros(1, 5), 2)
    assert m.tolist() == [[True, True, False, False, False]]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6),
       st.floats(0.01, 1.0), st.sampled_from(sorted(SCORERS)), st.integers(0, 1000))
def test_select_properties(b, n_refs, h, w, keep, selector, seed):
    views = [RefView(features=torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed + i)), index=i)
             for i in range(n_refs)]
    m1 = select(views, keep, selector, torch.Generator().manual_seed(seed))
    m2 = select(views, keep, selector, torch.Generator().manual_seed(seed))
    assert torch.equal(m1, m2)  # same generator -> same selection
    assert m1.shape == (b, n_refs * h * w)
    per_ref = m1.reshape(b, n_refs, h * w).sum(-1)
    assert bool((per_ref == count_for_ratio(h * w, keep)).all())  # budget respected, never empty
