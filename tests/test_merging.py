"""Pure token-merging primitives: exact small cases, properties, the per-generation cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensparse.merging import (
    MatchCache,
    Matching,
    TokenMergingConfig,
    bipartite_soft_matching,
    concat_matchings,
    destination_positions,
    match,
    match_positions,
    num_sources,
    random_destinations,
)

E1, E2, E3 = torch.eye(3)


def _hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    """8 tokens, destinations at 0 (= e1) and 7 (= e2); sources 1 (= e1), 2 (= e2) are perfect matches."""
    metric = torch.stack([E1, E1, E2, E1 + E3, E3, E3, E2 + 2 * E3, E2])[None]  # (1, 8, 3)
    is_dst = torch.tensor([True, False, False, False, False, False, False, True])
    return metric, is_dst


# ---------------------------------------------------------------------------------------------- exact cases


def test_hand_matching_exact() -> None:
    metric, is_dst = _hand_case()
    m = match(metric, is_dst, num=2)
    assert m.keep.tolist() == [[0, 3, 4, 5, 6, 7]]
    assert m.src.tolist() == [[1, 2]]
    assert m.slot.tolist() == [[0, 5]]
    assert m.index.tolist() == [[0, 0, 5, 1, 2, 3, 4, 5]]
    assert m.counts.tolist() == [[2, 1, 1, 1, 1, 2]]
    x = torch.arange(8.0).reshape(1, 8, 1)
    merged = m.merge(x)
    assert merged.flatten().tolist() == [0.5, 3, 4, 5, 6, 4.5]
    assert m.unmerge(merged).flatten().tolist() == [0.5, 0.5, 4.5, 3, 4, 5, 6, 4.5]
    assert m.merge(x, mode="keep").flatten().tolist() == [0, 3, 4, 5, 6, 7]


def test_third_merge_goes_to_most_similar_destination() -> None:
    metric, is_dst = _hand_case()
    m = match(metric, is_dst, num=3)
    # token 3 = e1+e3 (cos 0.71 to e1) beats token 6 = e2+2e3 (cos 0.45 to e2) and e3 tokens (cos 0)
    assert m.src.tolist() == [[1, 2, 3]]
    assert m.index[0, 3].item() == m.index[0, 0].item() == 0


def test_size_weighted_merge() -> None:
    metric, is_dst = _hand_case()
    m = match(metric, is_dst, num=1)  # merges token 1 into token 0
    x = torch.tensor([0.0, 4.0, 0, 0, 0, 0, 0, 0]).reshape(1, 8, 1)
    size = torch.tensor([[3.0, 1, 1, 1, 1, 1, 1, 1]])
    assert m.merge(x, size=size)[0, 0, 0].item() == pytest.approx(1.0)  # (3*0 + 1*4) / 4
    assert m.merge_size(size)[0].tolist() == [4, 1, 1, 1, 1, 1, 1]
    assert m.merge(x)[0, 0, 0].item() == pytest.approx(2.0)


def test_trailing_dims_kept() -> None:
    metric, is_dst = _hand_case()
    m = match(metric, is_dst, num=2)
    rope = torch.randn(1, 8, 4, 2)
    assert m.merge(rope, mode="keep").shape == (1, 6, 4, 2)
    assert torch.equal(m.merge(rope, mode="keep"), rope[:, [0, 3, 4, 5, 6, 7]])
    assert m.unmerge(m.merge(rope)).shape == (1, 8, 4, 2)


def test_zero_merges_is_identity() -> None:
    metric, is_dst = _hand_case()
    for m in (match(metric, is_dst, num=0), match(metric, is_dst, threshold=1.01)):
        assert m.num_merged == 0
        x = torch.randn(1, 8, 5)
        assert m.merge(x) is x and m.unmerge(x) is x


def test_adaptive_threshold_counts_and_batch_minimum() -> None:
    metric, is_dst = _hand_case()
    assert match(metric, is_dst, threshold=0.99).num_merged == 2
    assert match(metric, is_dst, threshold=0.7).num_merged == 3
    assert match(metric, is_dst, threshold=0.7, cap=1).num_merged == 1
    assert match(metric, is_dst, threshold=-1.0).num_merged == 6
    other = metric.clone()
    other[0, 2] = E3  # sample 2 has only one perfect match
    m = match(torch.cat([metric, other]), is_dst, threshold=0.99)
    assert m.num_merged == 1
    assert m.src.tolist() == [[1], [1]]


def test_centred_similarity_ignores_a_shared_component() -> None:
    """A large component common to every token makes raw cosines ~1 (an adaptive threshold merges all);
    centred, only the sources that really resemble a destination merge."""
    g = torch.Generator().manual_seed(0)
    detail = torch.randn(1, 16, 8, generator=g)
    detail[0, 1] = detail[0, 0] * 2  # source 1 points the way of destination 0
    x = detail + 100 * torch.ones(8)
    is_dst = torch.zeros(16, dtype=torch.bool)
    is_dst[0::4] = True
    assert match(x, is_dst, threshold=0.9).num_merged == 12  # every source
    centred = match(x, is_dst, threshold=0.9, center=True)
    assert 1 <= centred.num_merged < 12 and 1 in centred.src[0].tolist()
    assert TokenMergingConfig().center and not TokenMergingConfig(center=False).center
    with pytest.raises(TypeError):
        TokenMergingConfig(center=1)



def test_centred_matching_merges_a_constant_sequence() -> None:
    """Centred, a constant sequence is all zero vectors; its tokens are still identical, so they all merge (and
    a constant sample does not hold a batch's adaptive count at zero)."""
    is_dst = torch.zeros(16, dtype=torch.bool)
    is_dst[0::4] = True
    const = torch.full((1, 16, 8), 0.3)
    assert match(const, is_dst, threshold=0.9, center=True).num_merged == 12
    assert match(torch.zeros(1, 16, 8), is_dst, threshold=0.9, center=True).num_merged == 12
    g = torch.Generator().manual_seed(0)
    varied = torch.randn(1, 16, 8, generator=g)
    varied[0, 1] = varied[0, 0]  # one source identical to destination 0
    alone = match(varied, is_dst, threshold=0.9, center=True).num_merged
    assert alone >= 1 and match(torch.cat([const, varied]), is_dst, threshold=0.9, center=True).num_merged == alone


def test_bad_match_arguments() -> None:
    metric, is_dst = _hand_case()
    with pytest.raises(ValueError):
        match(metric, is_dst)
    with pytest.raises(ValueError):
        match(metric, is_dst, num=1, threshold=0.5)
    with pytest.raises(ValueError):
        match(metric, is_dst[:4], num=1)
    with pytest.raises(ValueError):
        bipartite_soft_matching(metric, (3, 3), ratio=0.5)
    x = torch.randn(2, 16, 4)
    for kwargs, err in (({"ratio": 1.0}, ValueError), ({"ratio": -0.1}, ValueError), ({"ratio": "0.5"}, TypeError),
                        ({"threshold": float("nan")}, ValueError), ({"center": "no"}, TypeError)):
        with pytest.raises(err):
            bipartite_soft_matching(x, (4, 4), **kwargs)
    # grid / cell / generator name themselves (were a bare unpack error, ZeroDivisionError, a negative-size
    # RuntimeError for (-4, -4), whose product matches, and randint's overload list)
    for grid, kwargs, err, name in (((4,), {}, TypeError, "grid"), ((4, 4.0), {}, TypeError, r"grid\[1\]"),
                                    ((-4, -4), {}, ValueError, r"grid\[0\]"), ((4, 4), {"cell": (0, 2)}, ValueError,
                                                                             r"cell\[0\]"),
                                    ((4, 4), {"generator": 5}, TypeError, "generator")):
        with pytest.raises(err, match=name):
            bipartite_soft_matching(x, grid, ratio=0.5, **kwargs)
    merge, unmerge = bipartite_soft_matching(x, [4, 4], ratio=0.5, cell=[2, 1])  # lists are pairs too
    assert merge(x).shape == (2, 8, 4) and unmerge(merge(x)).shape == x.shape
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        bipartite_soft_matching(x[0], (4, 4), ratio=0.5)
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        match(x[0], torch.ones(16, dtype=torch.bool), num=1)
    for bad in (5, "5", {1: 2}):  # a mapping is not a list of steps (its keys were taken for one)
        with pytest.raises(TypeError, match="recompute_steps"):
            TokenMergingConfig(recompute_steps=bad)


def test_merge_and_unmerge_refuse_tokens_of_another_shape() -> None:
    """A tensor with another batch or length but as many elements was read as this matching's rows: merge of a
    (4, 8, C) or (1, 32, C) tensor by a (2, 16) matching, unmerge of (1, 16, C) for (2, 8, C), returned garbage."""
    x = torch.randn(2, 16, 8)
    merge, unmerge = bipartite_soft_matching(x, (4, 4), ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert unmerge(merge(x)).shape == x.shape
    for bad in (torch.randn(4, 8, 8), torch.randn(1, 32, 8), torch.randn(2, 12, 8), torch.randn(32)):
        for mode in ("mean", "keep"):
            with pytest.raises(ValueError, match=r"x must be \(B, N, \.\.\.\) = \(2, 16, \.\.\.\)"):
                merge(bad, mode=mode)
    for bad in (torch.randn(1, 16, 8), torch.randn(4, 4, 8), torch.randn(2, 16, 8)):
        with pytest.raises(ValueError, match=r"y must be \(B, M, \.\.\.\) = \(2, 8, \.\.\.\)"):
            unmerge(bad)
    with pytest.raises(ValueError, match=r"size must be \(B, N\) = \(2, 16\)"):
        merge(x, size=torch.ones(1, 32))
    with pytest.raises(TypeError, match="floating point"):
        merge(torch.ones(2, 16, 8, dtype=torch.long))
    assert torch.equal(merge(torch.arange(32).reshape(2, 16), mode="keep"), merge(torch.arange(32.0).reshape(2, 16),
                                                                                 mode="keep").long())
    metric, is_dst = _hand_case()
    none = match(metric, is_dst, num=0)  # nothing merged: still only its own shape
    with pytest.raises(ValueError, match="x must be"):
        none.merge(torch.randn(2, 4, 3))


def test_match_refuses_destinations_that_are_not_a_bool_mask() -> None:
    """0/1 destinations as ints: ``~is_dst`` is -1/-2, so every token was a source (destinations merged into
    themselves, an index -1 deep in the matching)."""
    metric, is_dst = _hand_case()
    for bad in (is_dst.long(), is_dst.float(), is_dst.tolist()):
        with pytest.raises(TypeError, match="is_dst must be a bool tensor"):
            match(metric, bad, num=2)
    assert match(metric, is_dst, num=2).src.tolist() == [[1, 2]]


def test_concat_matchings_merges_each_run_as_its_own_matching_would() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3 * 16, 5, generator=g)
    parts = [match(x[:, i * 16:(i + 1) * 16], random_destinations(4, 4, g), num=4 + i) for i in range(3)]
    m = concat_matchings(parts)
    assert (m.batch_size, m.num_tokens, m.num_merged) == (2, 48, 4 + 5 + 6)
    merged, pieces = m.merge(x), [p.merge(x[:, i * 16:(i + 1) * 16]) for i, p in enumerate(parts)]
    assert torch.equal(merged, torch.cat(pieces, 1))
    assert torch.equal(m.unmerge(merged), torch.cat([p.unmerge(y) for p, y in zip(parts, pieces)], 1))
    assert torch.equal(m.merge(x, mode="keep"), torch.cat([p.merge(x[:, i * 16:(i + 1) * 16], mode="keep")
                                                          for i, p in enumerate(parts)], 1))
    assert torch.equal(m.keep, m.keep.sort(1).values) and concat_matchings(parts[:1]) is parts[0]
    with pytest.raises(ValueError, match="at least one"):
        concat_matchings([])
    with pytest.raises(ValueError, match="one batch size"):
        concat_matchings([parts[0], match(x[:1, :16], random_destinations(4, 4, g), num=2)])


def test_random_destinations_one_per_cell() -> None:
    g = torch.Generator().manual_seed(0)
    d = random_destinations(6, 7, g).reshape(6, 7)
    cells = d[:6, :6].reshape(3, 2, 3, 2).permute(0, 2, 1, 3).reshape(3, 3, 4)
    assert (cells.sum(-1) == 1).all()
    assert d[:, 6].all()  # partial cells at the edge are destinations
    a = random_destinations(8, 8, torch.Generator().manual_seed(3))
    b = random_destinations(8, 8, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_num_sources_counts_every_random_destinations_mask() -> None:
    for h, w, cell, seed in [(16, 16, (2, 2), 0), (7, 5, (2, 2), 1), (5, 9, (3, 2), 2), (1, 4, (2, 2), 3),
                             (6, 6, (1, 1), 4), (0, 3, (2, 2), 5), (8, 3, (4, 1), 6)]:
        is_dst = random_destinations(h, w, torch.Generator().manual_seed(seed), cell)
        assert num_sources(h, w, cell) == int((~is_dst).sum()), (h, w, cell)


def test_random_destinations_names_a_bad_grid_cell_or_generator() -> None:
    """They failed as a negative-size RuntimeError, ZeroDivisionError, an unpack error and randint's overload list."""
    for args, kwargs, err, name in (((-4, 4), {}, ValueError, "h"), ((4, -1), {}, ValueError, "w"),
                                    ((4.0, 4), {}, TypeError, "h"), ((4, 4), {"cell": (2,)}, TypeError, "cell"),
                                    ((4, 4), {"cell": (0, 2)}, ValueError, r"cell\[0\]"),
                                    ((4, 4), {"generator": 5}, TypeError, "generator")):
        with pytest.raises(err, match=name):
            random_destinations(*args, **kwargs)
    assert random_destinations(np.int64(4), 4, cell=[2, 2]).sum() == 4 and random_destinations(0, 3).numel() == 0


# -------------------------------------------------------------------------------------------------- config


def test_config_identity_and_validation() -> None:
    assert TokenMergingConfig().is_identity
    assert TokenMergingConfig(threshold=1.5).is_identity
    assert not TokenMergingConfig(threshold=0.9).is_identity
    assert not TokenMergingConfig(ratio=0.5).is_identity
    assert TokenMergingConfig(ratio=0.5, merge_attn=False, merge_mlp=False).is_identity
    assert TokenMergingConfig(recompute_steps=[5, 0, 5]).recompute_steps == (0, 5)
    assert TokenMergingConfig(recompute_steps=np.array([2, 0])).recompute_steps == (0, 2) == TokenMergingConfig(
        recompute_steps=range(0, 4, 2)).recompute_steps
    for bad in ({"ratio": 1.0}, {"ratio": -0.1}, {"recompute_every": 0}, {"recompute_steps": (-1,)},
                {"threshold": float("nan")}, {"threshold": -1.5}, {"max_downsample": 0}):
        with pytest.raises(ValueError):
            TokenMergingConfig(**bad)
    for bad in ({"ratio": "0.5"}, {"ratio": True}, {"seed": 1.0}, {"merge_mlp": 1}, {"recompute_every": 2.0}):
        with pytest.raises(TypeError):
            TokenMergingConfig(**bad)


def test_an_infinite_threshold_is_the_dense_model() -> None:
    """The docs say a threshold above 1 is the dense model, but ``float("inf")`` was refused ("must be finite")."""
    for inf in (float("inf"), np.float32("inf"), torch.tensor(float("inf")), 10**400):
        cfg = TokenMergingConfig(threshold=inf)
        assert cfg.threshold == float("inf") and cfg.is_identity and cfg.adaptive
    for bad in (float("-inf"), float("nan"), np.float64("-inf")):
        with pytest.raises(ValueError, match="threshold"):
            TokenMergingConfig(threshold=bad)
    with pytest.raises(TypeError, match="threshold"):
        TokenMergingConfig(threshold="inf")
    metric = torch.randn(2, 16, 4)
    merge, unmerge = bipartite_soft_matching(metric, (4, 4), threshold=float("inf"), center=True)
    assert torch.equal(merge(metric), metric) and torch.equal(unmerge(metric), metric)
    assert match(metric, random_destinations(4, 4, torch.Generator().manual_seed(0)),
                 threshold=float("inf")).num_merged == 0


def test_config_num_merged() -> None:
    assert TokenMergingConfig(ratio=0.5).num_merged(100, 75) == 50
    assert TokenMergingConfig(ratio=0.9).num_merged(100, 75) == 75
    assert TokenMergingConfig(threshold=0.5).num_merged(100, 75) == 75
    assert TokenMergingConfig(threshold=0.5, ratio=0.3).num_merged(100, 75) == 30


# --------------------------------------------------------------------------------------------------- cache


def _matching(n: int = 8, b: int = 1) -> Matching:
    return match(torch.randn(b, n, 4), torch.arange(n) % 4 == 0, num=2)


def test_cache_first_step_is_stored_and_hit() -> None:
    cache = MatchCache(recompute_every=5)
    x = torch.zeros(1, 8, 4)
    calls: list[int] = []

    def compute() -> Matching:
        calls.append(1)
        return _matching()

    first = cache.lookup("block0", 0, x, compute)
    assert cache.lookup("block0", 1, x, compute) is first  # step 1 reuses step 0's matching
    assert cache.hits == 1 and cache.misses == 1
    for step in range(2, 5):
        assert cache.lookup("block0", step, x, compute) is first
    assert cache.lookup("block0", 5, x, compute) is not first  # recompute at step 5
    assert len(calls) == 2


def test_cache_checks_its_policy_as_the_config_does() -> None:
    """MatchCache took recompute_every=2.5 (recomputing at steps 0, 5, 10...), True, and negative recompute steps,
    and failed on recompute_steps=3 with a TypeError that did not name it."""
    for kwargs, err in (({"recompute_every": 2.5}, TypeError), ({"recompute_every": True}, TypeError),
                        ({"recompute_every": 0}, ValueError), ({"recompute_steps": 3}, TypeError),
                        ({"recompute_steps": (2, -1)}, ValueError), ({"recompute_steps": "12"}, TypeError)):
        with pytest.raises(err, match=next(iter(kwargs))):
            MatchCache(**kwargs)
    cache = MatchCache(recompute_every=np.int64(3), recompute_steps=[4, 2, 2])
    assert cache.recompute_every == 3 and [s for s in range(6) if cache.recompute_at(s)] == [0, 2, 4]


def test_cache_never_crosses_generations() -> None:
    cache = MatchCache(recompute_every=1000)
    x = torch.zeros(1, 8, 4)
    old = cache.lookup("b", 0, x, _matching)
    assert cache.lookup("b", 7, x, _matching) is old
    cache.reset()
    assert len(cache) == 0
    new = cache.lookup("b", 0, x, _matching)
    assert new is not old
    assert cache.misses == 1 and cache.hits == 0
    # even a later step of the new generation never sees the old entry
    cache.reset()
    assert cache.lookup("b", 3, x, _matching) is not new


def test_cache_explicit_steps_passes_and_shapes() -> None:
    cache = MatchCache(recompute_steps=(0, 3))
    assert [cache.recompute_at(s) for s in range(5)] == [True, False, False, True, False]
    x = torch.zeros(1, 8, 4)
    cond = cache.lookup("b", 0, x, _matching)
    uncond = cache.lookup("b", 0, x, _matching)  # second pass of the same step: its own entry
    assert cond is not uncond
    assert cache.lookup("b", 1, x, _matching) is cond
    assert cache.lookup("b", 1, x, _matching) is uncond
    assert cache.lookup("b", 2, torch.zeros(2, 8, 4), lambda: _matching(b=2)) is not cond  # batch changed
    assert cache.lookup("other", 2, x, _matching) is not cond


def test_cache_passes_by_call_fingerprint() -> None:
    from tokensparse.merging import MAX_PASSES

    cache = MatchCache(recompute_every=2)
    x = torch.zeros(1, 8, 4)
    cond = cache.lookup("b", 0, x, _matching, call="cond")
    uncond = cache.lookup("b", 0, x, _matching, call="uncond")
    assert cond is not uncond
    assert cache.lookup("b", 0, x, _matching, call="cond") is cond  # an identical call: its own matching back
    assert cache.lookup("b", 0, x, _matching, call="uncond") is uncond
    assert len(cache) == 2
    assert cache.lookup("b", 1, x, _matching, call="cond'") is cond  # next step, first pass: reused (every 2)
    assert cache.lookup("b", 1, x, _matching, call="uncond'") is uncond
    assert cache.lookup("b", 2, x, _matching, call="cond''") is not cond  # recompute step
    for i in range(3 * MAX_PASSES):  # a loop over distinct calls at one timestep stays bounded
        cache.lookup("b", 2, x, _matching, call=i)
    assert len(cache) == MAX_PASSES


def test_cache_never_hands_an_inference_mode_matching_to_autograd() -> None:
    """A matching made under torch.inference_mode() was reused at a later step with grad on (a training step after
    a generation): its index tensors are inference tensors, and merging with them failed ("Inference tensors
    cannot be saved for backward")."""
    cache = MatchCache(recompute_every=5)
    x = torch.zeros(1, 8, 4)
    with torch.inference_mode():
        made = cache.lookup("b", 0, x, _matching)
        assert cache.lookup("b", 1, x, _matching) is made  # reused inside inference mode
    assert made.is_inference
    with torch.no_grad():
        assert cache.lookup("b", 2, x, _matching) is made  # no graph recorded: reusable
    tokens = torch.randn(1, 8, 4, requires_grad=True)
    fresh = cache.lookup("b", 3, x, _matching)
    assert fresh is not made and not fresh.is_inference
    fresh.unmerge(fresh.merge(tokens)).sum().backward()
    assert cache.lookup("b", 4, x, _matching) is fresh  # the step-3 one, made here, is reused as before


def test_matching_made_outside_inference_mode_with_flat_indices_made_inside_is_inference() -> None:
    m = _matching(b=2)  # batch > 1: its flattened indices are new tensors (batch 1: views, see below)
    assert not m.is_inference
    with torch.inference_mode():
        m.merge(torch.randn(2, 8, 4))  # builds and keeps its flattened index in inference mode
    assert m.is_inference


def test_batch_one_matching_stays_usable_by_autograd_after_merging_in_inference_mode() -> None:
    """A batch of one flattens its index tensors as views (no ops): made outside inference mode, they stay normal
    tensors when first used inside it, so the matching stays usable where autograd records."""
    m = _matching()
    with torch.inference_mode():
        m.merge(torch.randn(1, 8, 4))
    assert not m.is_inference
    tokens = torch.randn(1, 8, 4, requires_grad=True)
    m.unmerge(m.merge(tokens)).sum().backward()
    assert tokens.grad is not None


# ---------------------------------------------------------------------------------------------- fast path


def _plain_match(metric: torch.Tensor, is_dst: torch.Tensor, num: int | None, threshold: float | None,
                 cap: int | None, center: bool) -> tuple[torch.Tensor, ...]:
    """The matching as first written (F.normalize, a second norm for the at-mean test, out-of-place index ops,
    per-row offsets for the flattened indices): ``match`` / ``match_positions`` must give these tensors bit for bit."""
    b, n, _ = metric.shape
    dst_pos, src_pos = is_dst.nonzero().squeeze(1), (~is_dst).nonzero().squeeze(1)
    n_src = src_pos.numel()
    limit = n_src if cap is None else max(0, min(cap, n_src))
    if n_src == 0 or dst_pos.numel() == 0 or (num is not None and num <= 0) or limit == 0:
        keep = torch.arange(n).repeat(b, 1)
        return keep, keep[:, :0], keep[:, :0], keep, torch.ones(b, n, dtype=metric.dtype)
    m = metric if metric.dtype in (torch.float32, torch.float64) else metric.float()
    at_mean = None
    if center:
        c = m - m.mean(1, keepdim=True)
        at_mean = c.norm(dim=-1) <= 1e-5 * m.norm(dim=-1)
        m = c
    m = F.normalize(m, dim=-1, eps=1e-6)
    scores = m[:, src_pos] @ m[:, dst_pos].transpose(1, 2)
    if at_mean is not None and bool(at_mean.any()):
        scores = scores.masked_fill(at_mean[:, src_pos][:, :, None] & at_mean[:, dst_pos][:, None], 1.0)
    best, best_dst = scores.max(dim=-1)
    r = min(num, n_src) if num is not None else min(int((best >= threshold).sum(dim=-1).min()), limit)
    if r == 0:
        keep = torch.arange(n).repeat(b, 1)
        return keep, keep[:, :0], keep[:, :0], keep, torch.ones(b, n, dtype=metric.dtype)
    merged = best.argsort(dim=-1, descending=True, stable=True)[:, :r]
    src = src_pos[merged]
    dst_of_src = dst_pos[best_dst.gather(1, merged)]
    kept = torch.ones(b, n, dtype=torch.bool).scatter_(1, src, False)
    keep = kept.nonzero()[:, 1].reshape(b, n - r)
    index = kept.cumsum(1) - 1
    slot = index.gather(1, dst_of_src)
    index.scatter_(1, src, slot)
    counts = torch.ones(b, n - r, dtype=metric.dtype).scatter_add(1, slot, torch.ones(b, r, dtype=metric.dtype))
    return keep, src, slot, index, counts


def _plain_merge(x: torch.Tensor, keep: torch.Tensor, index: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    b, n, m = x.shape[0], x.shape[1], keep.shape[1]
    flat_index = (index + torch.arange(b)[:, None] * m).reshape(-1)
    out = x.new_zeros(b * m, x.shape[2]).index_add_(0, flat_index, x.reshape(b * n, -1))
    return out.div_(counts.reshape(-1, 1).to(out.dtype)).reshape(b, m, -1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3), st.sampled_from(["float32", "float64", "bfloat16"]),
       st.booleans(), st.sampled_from(["num", "threshold", "capped"]),
       st.sampled_from(["random", "ties", "constant", "collinear"]), st.integers(0, 2**16))
def test_match_is_bit_identical_to_the_plain_formulation(h, w, b, dtype, center, mode, tokens, seed) -> None:
    """The fast path (one norm per normalisation, in-place index ops, batch-one flattened indices as views) gives the
    plain formulation's matchings, merged tokens and unmerged outputs bit for bit, for every mode: centred or raw,
    ToMe or adaptive (capped), batch one or more, fp16-ish metrics, tied and at-mean tokens."""
    g = torch.Generator().manual_seed(seed)
    n = h * w
    metric = torch.randn(b, n, 5, generator=g).to(getattr(torch, dtype))
    if tokens == "ties":  # duplicated tokens: argsort's and max's tie-breaking decide
        metric[:, 1::2] = metric[:, :1]
    elif tokens == "constant":  # every token at its sequence's mean: the at-mean override
        metric[:, :] = metric[:, :1]
    elif tokens == "collinear":  # multiples of one token: cosines 1 up to rounding, whose last bit picks the order
        metric = (metric[:, :1] * torch.rand(b, n, 1, generator=g).add(0.1)).to(metric.dtype)
    is_dst = random_destinations(h, w, g)
    kw = {"num": n // 2} if mode == "num" else {"threshold": 0.2, "cap": n // 3 if mode == "capped" else None}
    got = match(metric, is_dst, center=center, **kw)
    want = _plain_match(metric, is_dst, kw.get("num"), kw.get("threshold"), kw.get("cap"), center)
    for name, ref in zip(("keep", "src", "slot", "index", "counts"), want):
        assert getattr(got, name).dtype == ref.dtype and torch.equal(getattr(got, name), ref), name
    same = match_positions(metric, *destination_positions(is_dst), center=center, **kw)
    assert all(torch.equal(getattr(same, k), getattr(got, k)) for k in ("keep", "src", "slot", "index", "counts"))
    x = torch.randn(b, n, 3, generator=g).to(metric.dtype)
    if got.num_merged:
        merged = got.merge(x)
        assert torch.equal(merged, _plain_merge(x, want[0], want[3], want[4]))
        flat_index = (want[3] + torch.arange(b)[:, None] * got.num_kept).reshape(-1)
        assert torch.equal(got.unmerge(merged), merged.reshape(-1, 3).index_select(0, flat_index).reshape(b, n, 3))
        assert torch.equal(got.merge(x, mode="keep"), x.gather(1, want[0][..., None].expand(-1, -1, 3)))


def test_destination_positions_are_the_masks_sources_and_destinations() -> None:
    is_dst = random_destinations(5, 7, torch.Generator().manual_seed(3))
    src_pos, dst_pos = destination_positions(is_dst)
    assert src_pos.dtype == dst_pos.dtype == torch.int64
    assert src_pos.tolist() == [i for i in range(35) if not is_dst[i]]
    assert dst_pos.tolist() == [i for i in range(35) if is_dst[i]]


# ---------------------------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 6),
       ratio=st.floats(0.0, 0.99), seed=st.integers(0, 2**16))
def test_merge_properties(b: int, h: int, w: int, c: int, ratio: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h * w, c, generator=g, dtype=torch.float64)
    is_dst = random_destinations(h, w, g)
    n_src = int((~is_dst).sum())
    m = match(x, is_dst, num=int(h * w * ratio))
    r = min(int(h * w * ratio), n_src)
    assert m.num_merged == r and m.num_kept == h * w - r
    merged = m.merge(x)
    # destinations always survive; kept positions ascend; index points at a kept token
    assert torch.isin(is_dst.nonzero().squeeze(1), m.keep).all()
    assert (m.keep.diff(dim=1) > 0).all()
    assert torch.equal(m.keep.gather(1, m.index.gather(1, m.keep)), m.keep)
    # mass is conserved: sum of (size * merged) equals the sum of the tokens
    assert torch.allclose((merged * m.counts[..., None]).sum(1), x.sum(1))
    assert m.counts.sum(1).tolist() == [float(h * w)] * b
    # unmerge copies: tokens merged into nothing come back exactly
    back = m.unmerge(merged)
    alone = (m.counts.gather(1, m.index) == 1)
    assert torch.equal(back[alone], x[alone])
    # merging a tensor that is constant within each group and unmerging is exact
    grouped = m.unmerge(m.merge(x, mode="keep"))
    assert torch.allclose(m.unmerge(m.merge(grouped)), grouped)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(2, 8), w=st.integers(2, 8), threshold=st.floats(-1.0, 1.0),
       seed=st.integers(0, 2**16))
def test_adaptive_properties(b: int, h: int, w: int, threshold: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h * w, 3, generator=g, dtype=torch.float64)
    is_dst = random_destinations(h, w, g)
    m = match(x, is_dst, threshold=threshold)
    xn = x / x.norm(dim=-1, keepdim=True)
    dst = is_dst.nonzero().squeeze(1)
    best = (xn @ xn[:, dst].transpose(1, 2)).max(-1).values                      # (B, N)
    # every merged source is at least threshold-similar to some destination
    assert (best.gather(1, m.src) >= threshold - 1e-9).all()
    # the batch merges the minimum of the per-sample counts
    counts = ((best >= threshold) & ~is_dst).sum(1)
    assert m.num_merged == int(counts.min())
