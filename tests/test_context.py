"""Sparse Context configs and masks (``tokensparse.context``)."""

import pytest
import torch

import tokensparse as ts
from tokensparse.context import MAX_COUNT, SparseContextConfig, keep_mask
from tokensparse.selection import RefView


def test_a_count_past_max_count_is_refused_and_one_up_to_it_keeps_at_most_each_reference():
    # count=10**30 was accepted: diffusers kept every token silently, RefDiT refused it only at apply
    for count in (MAX_COUNT + 1, 10**30):
        with pytest.raises(ValueError, match=rf"count must be in \[1, {MAX_COUNT}\], got {count}"):
            SparseContextConfig(count=count)
    cfg = SparseContextConfig(count=MAX_COUNT, selector="uniform")
    views = [RefView(torch.rand(2, 4, 4, 3)), RefView(torch.rand(2, 3, 5, 3), index=1)]
    assert keep_mask(views, cfg).all()  # min(count, n): references of any size keep all their tokens
    cfg.count = 10**30  # an edit after construction is checked again where the config is used
    with pytest.raises(ValueError, match="count must be in"):
        keep_mask(views, cfg)
    with pytest.raises(ValueError, match="count must be in"):
        ts.apply_sparse_context(ts.build_model("refdit-tiny"), cfg)
