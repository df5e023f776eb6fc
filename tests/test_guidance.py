import pytest
import torch

import tokensparse as ts
from tokensparse.guidance import Branch, CFGConfig, SparseGuidanceConfig, guided

from .conftest import make_refs, randomize


def recorder():
    calls = []

    def denoise(x, t, branches):
        calls.extend(branches)
        return [torch.full_like(x, 1.0 if b.cond else 0.0) + b.gamma for b in branches]

    return calls, denoise


def test_sparse_guidance_both_branches_conditional():
    calls, den = recorder()
    out = guided(den, SparseGuidanceConfig(scale=1.5, strong=0.5, weak=0.9))(torch.zeros(1, 3), torch.ones(1))
    assert [b.cond for b in calls] == [True, True] and [b.gamma for b in calls] == [0.5, 0.9]
    assert torch.allclose(out, torch.full((1, 3), 1.5 * 1.5 + (1 - 1.5) * 1.9))


def test_cfg_and_cfg_plus_sg_use_null_in_second_branch():
    calls, den = recorder()
    out = guided(den, CFGConfig(scale=3.0))(torch.zeros(1, 2), torch.ones(1))
    assert calls == [Branch(True, 0.0), Branch(False, 0.0)]
    assert torch.allclose(out, torch.full((1, 2), 3.0))
    calls.clear()
    guided(den, SparseGuidanceConfig(scale=1.3, strong=0.4, weak=0.8, null_weak=True))(torch.zeros(1, 2), torch.ones(1))
    assert calls == [Branch(True, 0.4), Branch(False, 0.8)]


def test_interval_runs_one_branch_outside():
    calls, den = recorder()
    fn = guided(den, SparseGuidanceConfig(interval=(0.2, 0.8)))
    fn(torch.zeros(1, 1), torch.tensor([0.9]))
    assert len(calls) == 1
    fn(torch.zeros(1, 1), torch.tensor([0.5]))
    assert len(calls) == 3


def test_interval_bounds_are_inclusive_in_the_samplers_float32():
    calls, den = recorder()
    fn = guided(den, CFGConfig(scale=2.0, interval=(0.0, 0.6)))
    t = torch.tensor([0.6])  # float32: 0.6000000238 > the Python float 0.6
    fn(torch.zeros(1, 1), t)
    assert len(calls) == 2


def test_interval_guides_each_sample_of_a_straddling_batch_by_its_own_time():
    calls, den = recorder()
    out = guided(den, CFGConfig(scale=3.0, interval=(0.2, 0.8)))(torch.zeros(2, 1, 2), torch.tensor([0.5, 0.9]))
    assert torch.equal(out, torch.tensor([[[3.0, 3.0]], [[1.0, 1.0]]]))  # guided: 3*1 - 2*0; outside: cond alone


def test_guided_checks_a_config_edited_after_construction_and_snapshots_it():
    """guided() took the scale and branches when called but read the interval at every step, unchecked: an
    interval edited to (0.7, 0.2) never guided (silently), one edited after guided() changed a running sampler."""
    calls, den = recorder()
    for field, value, err in (("interval", (0.7, 0.2), ValueError), ("scale", 5000.0, ValueError),
                              ("scale", "2", TypeError)):
        cfg = CFGConfig(scale=2.0)
        setattr(cfg, field, value)
        with pytest.raises(err, match=field):
            guided(den, cfg)
    cfg = CFGConfig(scale=2.0)
    fn = guided(den, cfg)
    cfg.interval, cfg.scale = (0.0, 0.1), 5.0  # later edits of the caller's object leave fn as it was made
    assert torch.equal(fn(torch.zeros(1, 1), torch.tensor([0.5])), torch.full((1, 1), 2.0)) and len(calls) == 2


@pytest.mark.parametrize("kw", [dict(strong=0.9, weak=0.5), dict(weak=1.0), dict(weak_keep=0.0),
                                dict(interval=(0.5, 0.2)), dict(strong=0.0, weak=0.0)])
def test_bad_sg_config(kw):
    with pytest.raises(ValueError):
        SparseGuidanceConfig(**kw)


def test_equal_routing_is_fine_when_the_weak_branch_sees_fewer_reference_tokens():
    strong, weak = SparseGuidanceConfig(strong=0.0, weak=0.0, weak_keep=0.1).branches()
    assert strong.cond and weak.cond and weak.ref_keep == 0.1 and strong.ref_keep == 1.0


@pytest.fixture
def routed():
    torch.manual_seed(0)
    return randomize(ts.build_model("refdit-tiny", depth=3, route_span=(1, 2)))


def test_routing_zero_is_exact_and_span_sees_fewer_tokens(routed):
    x, t, p = torch.randn(2, 3, 16, 16), torch.rand(2), ts.tokenize(["place", "place"])
    refs = make_refs(1, batch=2)
    assert torch.equal(routed(x, t, refs, p, route=0.0), routed(x, t, refs, p))
    seen = []
    for blk in routed.blocks:
        blk.attn.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[1]))
    out = routed(x, t, refs, p, route=0.5, route_generator=torch.Generator().manual_seed(0))
    assert seen == [16, 8, 16] and not torch.equal(out, routed(x, t, refs, p))


def test_routing_needs_a_span(tiny):
    with pytest.raises(ValueError, match="route_span"):
        tiny(torch.randn(1, 3, 16, 16), torch.rand(1), [], ts.tokenize("place"), route=0.5)


@pytest.mark.parametrize("kw, err, match", [
    (dict(routes=0.5), TypeError, "routes must be a tuple"), (dict(route=True), TypeError, "route must be a number"),
    (dict(route="0.5"), TypeError, "route must be a number"), (dict(routes=(0.5, None)), TypeError, "route must be"),
    (dict(route=1.0), ValueError, r"route must be in \[0.0, 1.0\)"),
])
def test_bad_routing_rates_name_the_argument(routed, kw, err, match):
    with pytest.raises(err, match=match):
        routed(torch.randn(1, 3, 16, 16), torch.rand(1), [], ts.tokenize("place"), **kw)


def test_a_rate_that_routes_every_target_token_is_refused(routed):
    x, t, p = torch.randn(1, 3, 16, 16), torch.rand(1), ts.tokenize("place")
    routed(x, t, [], p, route=0.95)  # 16 tokens: one stays
    with pytest.raises(ValueError, match="routes all 16 target tokens"):
        routed(x, t, [], p, route=0.97)
    with pytest.raises(ValueError, match="routes all 16 target tokens"):  # through Sparse Guidance's weak pass
        ts.generate(routed, [], "place", steps=1, guidance=ts.SparseGuidanceConfig(scale=2.0, strong=0.0, weak=0.99))


def test_rates_that_route_as_many_tokens_on_this_grid_are_refused(routed):
    # 16 target tokens: 0.01 and 0.02 both route 0 (the two branches were the same pass: guidance did nothing)
    for strong, weak in ((0.01, 0.02), (0.5, 0.52)):
        with pytest.raises(ValueError, match=r"both route \d+ of this model's 16 target tokens"):
            ts.generate(routed, [], "place", steps=1, guidance=ts.SparseGuidanceConfig(strong=strong, weak=weak))
    ts.generate(routed, [], "place", steps=1, guidance=ts.SparseGuidanceConfig(strong=0.5, weak=0.57))  # 8 vs 9
    ts.generate(routed, [], "place", steps=1, guidance=ts.SparseGuidanceConfig(strong=0.01, weak=0.02, null_weak=True))


def test_generate_with_sparse_guidance_keeps_prompt_in_both_branches(routed):
    prompts = []
    routed.prompt_embedder.register_forward_hook(lambda m, a, out: prompts.append(int(a[0].abs().sum())))
    refs = make_refs(2)
    g = SparseGuidanceConfig(scale=1.5, strong=0.25, weak=0.75)
    a = ts.generate(routed, refs, "place the subject", steps=2, guidance=g)
    # one call shared by both branches, once per generation (it was once per step before 0.20.0)
    assert a.shape == (1, 3, 16, 16) and len(prompts) == 1 and min(prompts) > 0
    assert torch.equal(a, ts.generate(routed, refs, "place the subject", steps=2, guidance=g))  # deterministic
    prompts.clear()
    ts.generate(routed, refs, "place the subject", steps=2, guidance=CFGConfig(scale=2.0))
    assert sorted(p > 0 for p in prompts) == [False, True]  # the null and the conditional prompt, once each


def test_sparse_reference_guidance_weak_branch_sees_fewer_reference_tokens(routed):
    counts = []
    routed.blocks[0].attn.register_forward_hook(lambda m, a, out: counts.append(a[2].shape[1]))
    g = SparseGuidanceConfig(scale=1.5, strong=0.25, weak=0.75, weak_keep=0.25)
    ts.generate(routed, make_refs(2), "place", steps=1, guidance=g)
    assert counts == [2 + 32, 2 + 8]  # BOS + word, then 2 refs x 16 tokens / x 4 tokens


def test_reference_only_guidance_without_references_is_refused(tiny):
    g = SparseGuidanceConfig(scale=1.5, strong=0.0, weak=0.0, weak_keep=0.25)  # needs no routing
    ts.generate(tiny, make_refs(1), "place", steps=1, guidance=g)
    with pytest.raises(ValueError, match="no references"):  # both branches would be the same dense pass
        ts.generate(tiny, [], "place", steps=1, guidance=g)
    ts.generate(tiny, [], "place", steps=1, guidance=SparseGuidanceConfig(strong=0.0, weak=0.0, weak_keep=0.25,
                                                                          null_weak=True))


def test_routes_share_the_trunk_and_equal_separate_calls(routed):
    from tokensparse.flops import count_flops

    x, t, p = torch.randn(2, 3, 16, 16), torch.rand(2), ts.tokenize(["place", "place"])
    refs = make_refs(1, batch=2)
    gen = torch.Generator().manual_seed(3)
    many = routed(x, t, refs, p, routes=(0.25, 0.75, 0.0), route_generator=gen)
    gen.manual_seed(3)
    one = [routed(x, t, refs, p, route=r, route_generator=gen) for r in (0.25, 0.75, 0.0)]
    assert len(many) == 3 and all(torch.equal(a, b) for a, b in zip(many, one))
    with torch.no_grad():
        both = count_flops(lambda: routed(x, t, refs, p, routes=(0.25, 0.75), route_generator=gen))
        apart = sum(count_flops(lambda r=r: routed(x, t, refs, p, route=r, route_generator=gen)) for r in (0.25, 0.75))
    assert both < apart  # block 0 (before the span) ran once
    with pytest.raises(ValueError, match="routes"):
        routed(x, t, refs, p, routes=())
    with pytest.raises(ValueError, match="not both"):
        routed(x, t, refs, p, route=0.5, routes=(0.25,))


def test_sparse_guidance_in_generate_equals_two_separate_passes(routed):
    """generate's shared-trunk SG step is the textbook w D(c; strong) + (1 - w) D(c; weak), bit for bit."""
    from tokensparse.flow import noise_like, timesteps

    g = SparseGuidanceConfig(scale=2.0, strong=0.25, weak=0.75)
    refs, ids = make_refs(1), ts.tokenize("place the subject")
    out = ts.generate(routed, refs, "place the subject", steps=1, seed=5, guidance=g)
    x = noise_like((1, 3, 16, 16), [5])
    t, t_next = (float(v) for v in timesteps(1))
    route_gen = torch.Generator().manual_seed(5 + 7919)  # generate's routing generator
    with torch.no_grad():
        d1, d2 = (routed(x, torch.full((1,), t), [r * 2 - 1 for r in refs], ids, route=r, route_generator=route_gen)
                  for r in (0.25, 0.75))
    x0 = x + (t_next - t) * (2.0 * d1 + (1 - 2.0) * d2)
    assert torch.equal(out, ((x0 + 1) / 2).clamp(0, 1))


def test_an_interval_given_as_an_array_is_its_pair():
    import numpy as np

    for pair in (np.array([0.2, 0.5]), torch.tensor([0.2, 0.5], dtype=torch.float64)):  # was "must be a pair"
        assert CFGConfig(interval=pair).interval == (0.2, 0.5)
    with pytest.raises(TypeError, match="interval"):
        CFGConfig(interval=np.array([0.1, 0.2, 0.3]))


@pytest.mark.parametrize("cls, kw, err", [
    (CFGConfig, dict(scale=float("nan")), ValueError), (CFGConfig, dict(scale="2"), TypeError),
    (CFGConfig, dict(interval=(0.1,)), TypeError), (CFGConfig, dict(interval=("a", "b")), TypeError),
    (SparseGuidanceConfig, dict(scale=float("inf")), ValueError),
    (CFGConfig, dict(scale=1e30), ValueError), (SparseGuidanceConfig, dict(scale=-1e4), ValueError),
    (SparseGuidanceConfig, dict(null_weak="yes"), TypeError),
    (SparseGuidanceConfig, dict(weak_keep="0.5"), TypeError),
])
def test_guidance_configs_reject_bad_values(cls, kw, err):
    with pytest.raises(err, match=next(iter(kw))):
        cls(**kw)


def test_a_weak_keep_that_keeps_every_reference_token_is_refused(tiny):
    # 16 px references of refdit-tiny: 16 tokens each; round(0.97 * 16) = 16 keeps them all, so the weak branch,
    # weakened by weak_keep alone, would be the strong one (guidance doing nothing at twice the cost)
    g = SparseGuidanceConfig(scale=3.0, strong=0.0, weak=0.0, weak_keep=0.97)
    with pytest.raises(ValueError, match="weak_keep=0.97 keeps every token"):
        ts.generate(tiny, make_refs(2), "place", steps=1, guidance=g)
    ts.generate(tiny, make_refs(2), "place", steps=1, guidance=SparseGuidanceConfig(strong=0.0, weak=0.0,
                                                                                    weak_keep=0.9))  # drops 2
    ts.generate(tiny, make_refs(2), "place", steps=1, guidance=SparseGuidanceConfig(strong=0.0, weak=0.0,
                                                                                    weak_keep=0.97, null_weak=True))
    ts.apply_sparse_context(tiny, ts.SparseContextConfig(keep=0.25, selector="uniform"))  # 4 tokens per reference
    with pytest.raises(ValueError, match="keeps every token"):  # round(0.9 * 4) = 4
        ts.generate(tiny, make_refs(2), "place", steps=1, guidance=SparseGuidanceConfig(strong=0.0, weak=0.0,
                                                                                        weak_keep=0.9))


def test_reference_only_guidance_is_told_by_the_routed_token_counts(routed):
    # strong and weak differ, but route as many of the 16 target tokens: weak_keep alone weakens the weak branch
    g = SparseGuidanceConfig(scale=1.5, strong=0.5, weak=0.52, weak_keep=0.5)
    with pytest.raises(ValueError, match="no references"):
        ts.generate(routed, [], "place", steps=1, guidance=g)


@pytest.mark.parametrize("cls", [CFGConfig, SparseGuidanceConfig])
def test_a_one_point_interval_is_refused_saying_why(cls):
    """``lo < hi`` is intended (the docstrings say so); the message said only the rule, and README read as if a
    closed one-point interval ``lo <= t <= hi`` with ``lo == hi`` were allowed."""
    with pytest.raises(ValueError, match="one-point interval would guide only a step whose time equals it"):
        cls(interval=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"lo < hi") as info:
        cls(interval=(0.6, 0.5))
    assert "one-point" not in str(info.value)
