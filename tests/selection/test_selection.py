import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensparse.context import SparseContextConfig, keep_mask
from tokensparse.selection import (
    INFORMED,
    SCORERS,
    RefView,
    allocate_mask,
    bayer_rank,
    count_for_ratio,
    floor_count,
    mass_count,
    select,
    topk_mask,
)
from tokensparse.tokens import dense_seq, subset


def test_count_for_ratio():
    assert count_for_ratio(64, 0.25) == 16 and count_for_ratio(64, 0.001) == 1 and count_for_ratio(0, 0.5) == 0
    assert count_for_ratio(10, 1.0) == 10


def test_floor_count():
    assert floor_count(64, 0.0) == 1 and floor_count(64, 0.1) == 7 and floor_count(64, 0.25) == 16
    assert floor_count(0, 0.5) == 0


def test_bayer_rank_is_a_spread_permutation():
    r = bayer_rank(4, 4)
    assert sorted((r * 16).round().long().tolist()) == list(range(16))
    first4 = (r * 16).round().long().reshape(4, 4) < 4  # the first quarter: one per 2x2 cell
    assert first4.reshape(2, 2, 2, 2).sum((1, 3)).eq(1).all()


def test_topk_mask_ties_deterministic():
    m = topk_mask(torch.zeros(1, 5), 2)
    assert m.tolist() == [[True, True, False, False, False]]


def test_topk_mask_tie_break_orders_equal_scores_only():
    scores = torch.tensor([[0.0, 5.0, 0.0, 0.0, 1.0]])
    tie = torch.tensor([0.1, 0.0, 0.2, 0.9, 0.0])
    assert topk_mask(scores, 3, tie).tolist() == [[False, True, False, True, True]]


def test_mass_count_exact():
    s = torch.tensor([[0.0, 0.0, 6.0, 3.0, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    assert mass_count(s, 0.6, 1, 5).tolist() == [1, 1]  # 6/10 covers 60 %; a massless row keeps lo
    assert mass_count(s, 0.9, 1, 5).tolist() == [2, 1]
    assert mass_count(s, 1.0, 1, 5).tolist() == [3, 1]
    assert mass_count(s, 1.0, 1, 2).tolist() == [2, 1]  # clamped to hi
    with pytest.raises(ValueError):
        mass_count(s, 0.0, 1, 5)


def test_allocate_gives_an_empty_reference_only_its_floor():
    busy = torch.rand(1, 16, generator=torch.Generator().manual_seed(0)) + 0.1
    empty = torch.zeros(1, 16)
    a, b = allocate_mask([busy, empty], [4, 4], [1, 1])
    assert int(a.sum()) == 7 and int(b.sum()) == 1


def test_allocate_is_scale_free():
    small = torch.zeros(1, 16)
    small[0, 5] = 0.01  # a one-token subject with tiny raw scores
    busy = torch.rand(1, 16, generator=torch.Generator().manual_seed(1)) * 100
    a, b = allocate_mask([small, busy], [4, 4], [1, 1])
    assert bool(a[0, 5]) and int(a.sum()) == 1 and int(b.sum()) == 7


def test_allocate_lets_references_of_different_sizes_compete_on_equal_terms():
    g = torch.Generator().manual_seed(2)
    small, big = torch.rand(1, 64, generator=g), torch.rand(1, 256, generator=g)  # equally busy, 4x the tokens
    a, b = allocate_mask([small, big], [16, 64], [1, 1])
    assert 0.15 < a.float().mean() < 0.35 and 0.15 < b.float().mean() < 0.35  # was 58 / 22 tokens: big starved
    busy, sparse = torch.rand(1, 128, generator=g) + 0.1, torch.zeros(1, 256)
    sparse[0, :8] = 1.0  # a big reference whose score sits in 8 tokens: it still yields the rest
    a, b = allocate_mask([busy, sparse], [32, 64], [1, 1])
    assert int(b.sum()) == 8 and int(a.sum()) == 88


def test_score_allocation_keeps_the_total_of_the_other_allocations():
    """allocate="score" only moves budget between references: each sample keeps exactly what "equal" keeps, the sum
    of every reference's own budget (round(keep * n_r) each, so not always round(keep * sum n_r)), for references of
    different sizes and counts, blank ones, floors and counts."""
    import random

    rng = random.Random(0)
    for case in range(150):
        grids = [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(rng.randint(2, 4))]
        b, seed = rng.randint(1, 2), rng.randint(0, 99)
        views = [RefView(torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed + i))
                         * (0.0 if rng.random() < 0.2 else 1.0), index=i) for i, (h, w) in enumerate(grids)]
        keep = rng.choice([0.05, 0.1, 0.125, 0.25, 0.3, 1 / 3, 0.375, 0.5, 0.625, 0.9, 1.0])
        kw = {"count": rng.randint(1, 12)} if rng.random() < 0.2 else {"min_keep": rng.choice([0.0, 0.05, keep / 2])}
        selector = rng.choice(["edges", "foreground", "detail", "uniform", "random"])
        kept = {a: select(views, 1.0 if "count" in kw else keep, selector, torch.Generator().manual_seed(seed),
                          allocate=a, **kw).sum(1) for a in ("equal", "score", "auto")}
        ns = [h * w for h, w in grids]
        total = sum(min(n, kw["count"]) if "count" in kw else count_for_ratio(n, keep) for n in ns)
        for allocate, k in kept.items():
            assert k.tolist() == [total] * b, (case, grids, keep, kw, selector, allocate)


def subject_image(size=16, box=(4, 8, 4, 8), bg=(0.2, 0.5, 0.8)):
    img = torch.tensor(bg).view(1, 3, 1, 1).expand(1, 3, size, size).clone()
    y0, y1, x0, x1 = box
    img[:, :, y0:y1, x0:x1] = torch.rand(1, 3, y1 - y0, x1 - x0, generator=torch.Generator().manual_seed(0))
    return img


def view_of(img, patch=4, prompts=None):
    from tokensparse.models.layers import patchify

    return RefView(features=patchify(img, patch), image=img, prompts=prompts)


def test_foreground_keeps_exactly_the_subject_tokens():
    v = view_of(subject_image(box=(4, 8, 4, 12)))  # covers tokens (1,1) and (1,2) of a 4x4 grid
    s = SCORERS["foreground"](v, torch.Generator())
    assert set(s[0].nonzero().flatten().tolist()) == {5, 6}
    m = select([v], 1.0, "foreground", torch.Generator(), adaptive=True, mass=0.99)
    assert set(m[0].nonzero().flatten().tolist()) == {5, 6}


def test_edges_zero_on_flat_image_and_high_on_texture():
    flat = view_of(torch.full((1, 3, 16, 16), 0.3))
    assert torch.equal(SCORERS["edges"](flat, torch.Generator()), torch.zeros(1, 16))
    v = view_of(subject_image(box=(0, 8, 0, 8)))
    s = SCORERS["edges"](v, torch.Generator())[0].reshape(4, 4)
    assert s[:2, :2].min() > s[2:, 2:].max()
    no_pixels = RefView(features=v.features)  # feature-only (latents): token-grid gradient
    assert SCORERS["edges"](no_pixels, torch.Generator()).shape == (1, 16)


def test_count_is_exact_per_reference_with_equal_and_the_average_when_shared():
    small, big = view_of(subject_image(box=(4, 8, 4, 8))), view_of(subject_image(box=(0, 12, 0, 16)))
    views = [small, big]

    def kept(cfg: SparseContextConfig) -> list[int]:
        return [int(m.sum()) for m in keep_mask(views, cfg).split([16, 16], dim=1)]

    assert kept(SparseContextConfig(count=5, selector="foreground", allocate="equal")) == [5, 5]
    shared = kept(SparseContextConfig(count=5, selector="foreground"))  # allocate "auto": shared by score
    assert sum(shared) == 10 and shared[0] < shared[1]
    assert kept(SparseContextConfig(count=5, selector="uniform")) == [5, 5]  # uninformed: "auto" is "equal"


def test_adaptive_budgets_refuse_score_allocation_they_would_ignore():
    with pytest.raises(ValueError, match="allocate='score'.*adaptive"):
        SparseContextConfig(selector="foreground", adaptive=True, allocate="score")
    for allocate in ("auto", "equal"):  # what adaptive does: a budget per reference
        assert SparseContextConfig(selector="foreground", adaptive=True, allocate=allocate).adaptive


def test_select_refuses_a_count_that_would_keep_nothing():
    views = [view_of(subject_image(box=(4, 8, 4, 8)))]
    g = torch.Generator().manual_seed(0)
    for bad, err in ((0, ValueError), (-3, ValueError), (2.5, TypeError)):
        with pytest.raises(err, match="count"):
            select(views, 1.0, "uniform", g, count=bad)
    assert int(select(views, 1.0, "uniform", g, count=3).sum()) == 3


def test_attention_scores_only_the_mass_above_the_uniform_share():
    # a probe's positional ripple (+-10 %) around the uniform share, and two tokens the target singles out
    att = (1 + 0.1 * torch.linspace(-1, 1, 16)) / 16
    att[[5, 6]] = 4 / 16
    v = RefView(features=torch.zeros(1, 4, 4, 3), attention=(att / att.sum()).reshape(1, 4, 4))
    s = SCORERS["attention"](v, torch.Generator())[0]
    assert int((s > 0).sum()) <= 9 and s[[5, 6]].min() > 10 * s[[0, 1, 2, 3, 4, 7, 8]].max()
    m = select([v], 1.0, "attention", torch.Generator(), adaptive=True, mass=0.9)
    assert set(m[0].nonzero().flatten().tolist()) == {5, 6}


def test_blank_reference_adaptive_keeps_one_token():
    v = view_of(torch.full((1, 3, 16, 16), 0.5))
    for sel in ("foreground", "edges"):
        m = select([v], 1.0, sel, torch.Generator(), adaptive=True)
        assert int(m.sum()) == 1


def test_ties_on_a_plain_background_spread_evenly():
    v = view_of(torch.full((1, 3, 16, 16), 0.5))
    m = select([v], 0.25, "foreground", torch.Generator())
    assert m[0].reshape(2, 2, 2, 2).sum((1, 3)).eq(1).all()  # one per 2x2 cell, like "uniform"


def make_views(b, n_refs, h, w, seed, blank_every=0):
    views = []
    for i in range(n_refs):
        f = torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed + i))
        if blank_every and i % blank_every == 0:
            f = torch.zeros_like(f)
        views.append(RefView(features=f, index=i))
    return views


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6),
       st.floats(0.01, 1.0), st.sampled_from(sorted(SCORERS)), st.integers(0, 1000),
       st.sampled_from(["fixed", "count", "adaptive", "score", "equal"]), st.floats(0.05, 1.0),
       st.integers(0, 2))
def test_select_properties(b, n_refs, h, w, keep, selector, seed, budget, mass, blank_every):
    import warnings

    warnings.simplefilter("ignore")  # 'attention' without a probe falls back with a warning
    n = h * w
    cfg = {"keep": keep, "selector": selector, "seed": seed}
    if budget == "count":
        cfg = {"selector": selector, "seed": seed, "count": max(1, int(keep * 8))}
    elif budget == "adaptive" and selector in INFORMED:  # adaptive needs score mass (uninformed: a ValueError)
        cfg.update(adaptive=True, mass=mass)
    elif budget in ("score", "equal"):
        cfg.update(allocate=budget)
    config = SparseContextConfig(**cfg)
    views = make_views(b, n_refs, h, w, seed, blank_every)
    m1, m2 = keep_mask(views, config), keep_mask(views, config)
    assert torch.equal(m1, m2)  # same seed (generator) -> same selection
    assert m1.shape == (b, n_refs * n) and m1.dtype == torch.bool
    per_ref = m1.reshape(b, n_refs, n).sum(-1)
    assert bool((per_ref >= 1).all())  # never empty for a non-empty reference
    budget_per_ref = min(n, config.count) if config.count else count_for_ratio(n, config.keep)
    if config.adaptive or budget in ("fixed", "count", "equal") and n_refs == 1 or budget == "equal":
        assert bool((per_ref <= budget_per_ref).all())
    if not config.adaptive:
        assert bool((per_ref.sum(-1) == n_refs * budget_per_ref).all())  # the average budget is respected
        if budget == "equal" or n_refs == 1 or (budget != "score" and selector not in INFORMED):
            assert bool((per_ref == budget_per_ref).all())
    # kept tokens as a sparse sequence: ids unique, sorted (dense order), in range
    grids = [torch.zeros(b, h, w, 1) for _ in range(n_refs)]
    seq = subset(dense_seq(grids), m1)
    for row in range(b):
        valid = seq.valid[row] if seq.valid is not None else torch.ones(seq.ids.shape[1], dtype=torch.bool)
        ids = seq.ids[row][valid]
        flat = (ids[:, 0] - 1) * n + ids[:, 1] * w + ids[:, 2]
        assert torch.equal(flat, torch.unique(flat))  # unique and sorted
        assert int(flat.min()) >= 0 and int(flat.max()) < n_refs * n
        assert ids[:, 1].max() < h and ids[:, 2].max() < w


def test_random_differs_across_seeds_and_matches_for_equal_seeds():
    views = make_views(1, 1, 8, 8, 0)
    a = select(views, 0.25, "random", torch.Generator().manual_seed(1))
    b = select(views, 0.25, "random", torch.Generator().manual_seed(1))
    c = select(views, 0.25, "random", torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_select_rejects_bad_names():
    with pytest.raises(ValueError, match="selector"):
        select(make_views(1, 1, 2, 2, 0), 0.5, "magic", torch.Generator())
    with pytest.raises(ValueError, match="allocate"):
        select(make_views(1, 1, 2, 2, 0), 0.5, "random", torch.Generator(), allocate="fair")


def test_detail_order_is_a_permutation_that_covers_the_grid():
    from tokensparse.selection.scorers import spread_order

    energy = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    s = spread_order(energy, 8, 8)
    assert torch.equal(torch.sort(s[0]).values, torch.sort(1 - torch.arange(64) / 64).values)
    m = topk_mask(s, 16).reshape(2, 8, 8)
    assert m.reshape(2, 4, 2, 4, 2).sum((-1, -3)).eq(1).all()  # one token in every 2x2 cell of the grid...
    e = energy.reshape(2, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(2, 16, 4)
    kept = m.reshape(2, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(2, 16, 4)
    assert torch.equal(kept.float().argmax(-1), e.argmax(-1))  # ... the one with the most energy
    flat = spread_order(torch.zeros(1, 64), 8, 8)  # flat energy: exactly the ordered-dither ("uniform") order
    assert torch.equal(topk_mask(flat, 16), topk_mask((1 - bayer_rank(8, 8))[None], 16))


def test_detail_order_does_not_depend_on_the_default_dtype():
    # a float64 default made spread_order's float64 buffers meet its float32 energy: scatter_reduce raised
    from tokensparse.selection.scorers import spread_order

    energy = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    want = spread_order(energy, 8, 8)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = spread_order(energy, 8, 8)
    finally:
        torch.set_default_dtype(default)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("selector", sorted(SCORERS))
@pytest.mark.parametrize("budget", [{}, {"allocate": "score"}, {"count": 3}, {"adaptive": True}, {"min_keep": 0.5}])
def test_a_reference_with_no_tokens_keeps_none_under_every_selector(selector, budget):
    # edges / foreground / detail / attention / auto crashed on a 0 x w grid (IndexError / RuntimeError) where
    # random and uniform kept nothing of it; allocate="score" crashed for every selector beside a non-empty one
    if budget.get("adaptive") and selector not in INFORMED:
        return
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(2, 4, 4, 3, generator=g)
    img = torch.rand(2, 3, 16, 16, generator=g)
    busy = RefView(feats, image=img, index=1, prompts=["place it", "recolor it"])
    keep = 1.0 if "count" in budget else 0.5
    alone = select([busy], keep, selector, torch.Generator().manual_seed(1), **budget)
    for grid in ((0, 4), (4, 0)):
        empty = RefView(torch.rand(2, *grid, 3), image=torch.rand(2, 3, 4 * grid[0], 4 * grid[1]),
                        prompts=["place it", "recolor it"])
        m = select([empty, busy], keep, selector, torch.Generator().manual_seed(1), **budget)
        assert torch.equal(m, alone)  # the empty reference holds no columns; the other keeps what it keeps alone
        assert select([empty], keep, selector, g, **budget).shape == (2, 0)


@pytest.mark.parametrize("selector", sorted(SCORERS))
def test_every_scorer_called_directly_scores_an_empty_reference_as_none(selector):
    # score_views guarded a 0 x w grid, but the public scorers themselves crashed on it (edges / detail:
    # adaptive_avg_pool2d RuntimeError; foreground / attention / auto: median IndexError)
    g = torch.Generator().manual_seed(0)
    for grid in ((0, 4), (4, 0)):
        view = RefView(torch.rand(2, *grid, 3), image=torch.rand(2, 3, 4 * grid[0], 4 * grid[1]),
                       prompts=["place it", "recolor it"])
        scores = SCORERS[selector](view, g)
        assert scores.shape == (2, 0) and scores.dtype == torch.float32


@pytest.mark.parametrize("selector, reason", [("random", "without regard to content"),
                                              ("uniform", "without regard to content"),
                                              ("detail", "scores are ranks, not mass")])
def test_adaptive_refusal_says_why_the_selector_has_no_mass(selector, reason):
    with pytest.raises(ValueError, match="adaptive budgets count score mass") as exc:
        SparseContextConfig(selector=selector, adaptive=True)
    assert reason in str(exc.value)  # detail scores edges: "without regard to content" was wrong about it
