import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensparse.tokens import dense_seq, gather, grid_ids, pack_index, ref_slices, scatter, subset


def test_grid_ids_row_major():
    ids = grid_ids(2, 2, 3)
    assert ids.tolist() == [[2, 0, 0], [2, 0, 1], [2, 0, 2], [2, 1, 0], [2, 1, 1], [2, 1, 2]]


def test_dense_seq_concatenates_refs_with_ids():
    a, b = torch.randn(2, 2, 2, 5), torch.randn(2, 3, 1, 5)
    seq = dense_seq([a, b])
    assert seq.tokens.shape == (2, 7, 5) and seq.valid is None and seq.grids == ((2, 2), (3, 1))
    assert torch.equal(seq.tokens[:, :4], a.reshape(2, 4, 5))
    assert seq.ids[0, 4].tolist() == [2, 0, 0] and seq.ids[1, 6].tolist() == [2, 2, 0]
    assert [s.stop for s in ref_slices(seq.grids)] == [4, 7]


def test_subset_keeps_ids_and_pads_unequal_counts():
    seq = dense_seq([torch.arange(8.0).reshape(2, 2, 2, 1)])
    keep = torch.tensor([[True, False, False, True], [False, True, False, False]])
    sub = subset(seq, keep)
    assert sub.tokens[..., 0].tolist() == [[0.0, 3.0], [5.0, 4.0]]  # row 1: slot 1 is padding
    assert sub.valid.tolist() == [[True, True], [True, False]]
    assert sub.ids[0, 1].tolist() == [1, 1, 1] and sub.ids[1, 0].tolist() == [1, 0, 1]
    assert sub.counts().tolist() == [2, 1]
    with pytest.raises(ValueError, match=r"keep mask \(2, 4\) does not match sequence \(2, 2\)"):
        subset(sub, keep)  # a dense-length mask on a padded, already sparse sequence (not a broadcast error)


def test_equal_counts_need_no_padding():
    keep = torch.tensor([[True, False, True], [False, True, True]])
    index, valid = pack_index(keep)
    assert valid is None and index.tolist() == [[0, 2], [1, 2]]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(0, 10_000))
def test_scatter_inverts_gather(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, n, generator=g) < 0.5
    x = torch.randn(b, n, 4, generator=g)
    index, valid = pack_index(keep)
    back = scatter(gather(x, index), index, valid, n, fill=0.0)
    assert torch.equal(back, torch.where(keep[..., None], x, torch.zeros_like(x)))


def test_kept_grids_recover_the_keep_mask_per_reference():
    g = torch.Generator().manual_seed(0)
    seq = dense_seq([torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 2, 2, 5, generator=g)])
    keep = torch.rand(2, seq.dense_len, generator=g) < 0.5
    keep[:, 0] = True
    sub = subset(seq, keep)
    for b in range(2):
        masks = sub.kept_grids(b)
        assert [m.shape for m in masks] == [(3, 4), (2, 2)]
        assert torch.equal(torch.cat([m.flatten() for m in masks]), keep[b])
    assert all(m.all() for m in seq.kept_grids(1))


@pytest.mark.parametrize("block", [None, 1, 50])  # distances computed whole, one row at a time, in row blocks
def test_stand_in_sizes_match_a_brute_force_assignment(block, monkeypatch):
    import tokensparse.tokens as tokens
    from tokensparse.tokens import stand_in_sizes

    if block is not None:
        monkeypatch.setattr(tokens, "CDIST_ELEMENTS", block)
    g = torch.Generator().manual_seed(0)
    for b, n, c in ((3, 20, 5), (1, 7, 1), (2, 64, 12)):
        feats = torch.randint(0, 4, (b, n, c), generator=g).float()  # many ties, many duplicates
        keep = torch.rand(b, n, generator=g) < 0.3
        keep[0] = False  # a sample that keeps nothing
        keep[-1, 0] = True
        sizes = stand_in_sizes(feats, keep)
        for s in range(b):
            want = torch.zeros(n)
            kept = torch.nonzero(keep[s]).squeeze(1).tolist()
            for i in range(n):
                if keep[s, i]:
                    want[i] += 1
                elif kept:  # the nearest kept token, the first of equals
                    d = [float((feats[s, i] - feats[s, j]).norm()) for j in kept]
                    want[kept[d.index(min(d))]] += 1
            assert torch.equal(sizes[s], want), s
            assert float(sizes[s].sum()) == (n if kept else 0)
    with pytest.raises(ValueError, match="keep a \\(B, N\\) bool mask"):
        stand_in_sizes(torch.rand(1, 4, 2), torch.ones(1, 4))


def test_subset_carries_sizes():
    seq = dense_seq([torch.rand(2, 2, 3, 4)])
    seq.sizes = torch.arange(12.0).reshape(2, 6)
    keep = torch.tensor([[True, False, True, False, False, False], [False, True, False, False, False, False]])
    out = subset(seq, keep)
    assert out.valid.tolist() == [[True, True], [True, False]] and out.sizes[out.valid].tolist() == [0.0, 2.0, 7.0]
    assert subset(dense_seq([torch.rand(1, 2, 2, 4)]), torch.ones(1, 4, dtype=torch.bool)).sizes is None
