"""The exactness claims of the RefDiT Python API, checked across combinations of references, batches and methods.

``keep=1.0`` is the dense model; ``cache=True`` equals recomputing the context every step; ``remove_*`` restores
the exact model in any order; a generation selects once; ``count=`` and ``keep=`` agree; FLOPs follow the tokens.
"""

import itertools

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st

import tokensparse as ts
from tokensparse.flops import count_flops, flop_counter
from tokensparse.selection import INFORMED, SCORERS

from .conftest import make_refs, randomize

PROMPT = "place the subject top left"
PROMPTS = [PROMPT, "recolor the red object blue", ""]  # "" is the null condition: CFG's two branches are one call


def kv_model(**kw) -> ts.RefDiT:
    with torch.random.fork_rng():  # built at import: leave the global generator as it was
        torch.manual_seed(0)
        return randomize(ts.build_model("refdit-tiny", ref_attends_target=False, **kw))


def gen(model: ts.RefDiT, refs, prompt=PROMPT, **kw) -> torch.Tensor:
    return ts.generate(model, refs, prompt, **{"steps": 3, "seed": 0, **kw})


def clear(model: ts.RefDiT) -> None:
    ts.remove_sparse_context(model)
    ts.remove_token_merging(model)


def test_keep_one_is_the_dense_model_for_every_selector_with_and_without_the_cache(tiny, tiny_kv):
    for model, cache in ((tiny, False), (tiny_kv, False), (tiny_kv, True)):
        for n, batch in ((1, 1), (2, 3), (4, 1), (3, 3)):
            refs, prompt = make_refs(n, batch=batch, seed=n), PROMPT if batch == 1 else PROMPTS
            dense = gen(model, refs, prompt, seed=n)
            for selector, proportional in itertools.product(sorted(SCORERS), (False, True)):
                ts.apply_sparse_context(model, ts.SparseContextConfig(keep=1.0, selector=selector, cache=cache,
                                                                      proportional=proportional))
                ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.0) if proportional else
                                       ts.TokenMergingConfig(threshold=1.5))  # merging's identities beside it
                assert torch.equal(gen(model, refs, prompt, seed=n), dense), (selector, proportional, n, batch)
            clear(model)


GUIDANCE = [None, ts.CFGConfig(2.0), ts.CFGConfig(3.0, interval=(0.2, 0.7)), ts.SparseGuidanceConfig(2.0, 0.25, 0.5),
            ts.SparseGuidanceConfig(2.0, 0.0, 0.0, weak_keep=0.25),
            ts.SparseGuidanceConfig(1.5, 0.0, 0.25, null_weak=True, weak_keep=0.5)]
MERGING = [None, ts.TokenMergingConfig(ratio=0.5), ts.TokenMergingConfig(threshold=0.1, recompute_every=2, seed=3)]
ROUTED = kv_model(route_span=(1, 2), text_depth=2)  # guidance that routes needs a span; a text encoder pads prompts


@st.composite
def budgets(draw) -> dict:
    selector = draw(st.sampled_from(sorted(SCORERS)))
    cfg = {"selector": selector, "seed": draw(st.integers(0, 5)), "proportional": draw(st.booleans())}
    kind = draw(st.sampled_from(["keep", "count", "adaptive"] if selector in INFORMED else ["keep", "count"]))
    if kind == "adaptive":
        return {**cfg, "adaptive": True, "mass": draw(st.sampled_from([0.3, 0.6, 0.9])),
                "keep": draw(st.sampled_from([0.5, 1.0])), "min_keep": draw(st.sampled_from([0.0, 0.1]))}
    budget = {"keep": draw(st.sampled_from([0.1, 0.25, 0.5, 0.8]))} if kind == "keep" else {
        "count": draw(st.integers(1, 15))}
    return {**cfg, **budget, "allocate": draw(st.sampled_from(["auto", "equal", "score"]))}


@settings(max_examples=30, deadline=None)
@given(cfg=budgets(), n_refs=st.integers(0, 4), batch=st.sampled_from([1, 3]), per_sample_prompts=st.booleans(),
       guidance=st.sampled_from(GUIDANCE), merging=st.sampled_from(MERGING), steps=st.integers(1, 3),
       seed=st.integers(0, 100))
def test_the_kv_cache_equals_recomputing_every_step(cfg, n_refs, batch, per_sample_prompts, guidance, merging, steps,
                                                    seed):
    refs = make_refs(n_refs, batch=batch, seed=seed)  # a batch of different references per sample
    prompt = PROMPTS[:batch] if per_sample_prompts else PROMPTS[seed % 3]
    if n_refs == 0 and batch > 1 and not per_sample_prompts:
        prompt = [prompt] * batch
    if n_refs == 0 and isinstance(guidance, ts.SparseGuidanceConfig) and guidance.strong == guidance.weak:
        guidance = ts.CFGConfig(2.0)  # weak_keep alone needs references
    outs = []
    try:
        for cache in (False, True):
            ts.apply_sparse_context(ROUTED, ts.SparseContextConfig(cache=cache, **cfg))
            if merging is not None:
                ts.apply_token_merging(ROUTED, merging)
            try:
                outs.append(gen(ROUTED, refs, prompt, steps=steps, seed=seed, guidance=guidance))
            except ValueError as exc:  # weak_keep alone on references that keep one token each (count=1, a small
                if "keeps every token of this call's references" not in str(exc):  # adaptive mass): refused, as
                    raise  # both branches would be one; not a case of the cache
                reject()
    finally:
        clear(ROUTED)
    assert torch.equal(*outs)


@pytest.mark.parametrize("merging", MERGING[1:])
def test_cfg_with_the_null_prompt_and_token_merging_is_the_same_with_the_cache(merging):
    # the prompt "" makes CFG's branches one call; without the cache they share one reference TokenSeq and reused
    # one matching, with it their two (equal) K/V caches were told apart by identity: new destinations, another image
    outs = []
    for cache in (False, True):
        ts.apply_sparse_context(ROUTED, ts.SparseContextConfig(keep=0.25, selector="uniform", cache=cache))
        ts.apply_token_merging(ROUTED, merging)
        outs.append(gen(ROUTED, make_refs(2), "", guidance=ts.CFGConfig(2.0)))
        clear(ROUTED)
    assert torch.equal(*outs)


def test_every_apply_and_remove_order_gives_the_exact_model_of_what_is_applied(tiny_kv):
    refs = make_refs(3, seed=1)
    sc = ts.SparseContextConfig(keep=0.25, selector="auto", cache=True, proportional=True)
    tm = ts.TokenMergingConfig(ratio=0.5)
    want = {}
    for s, t in itertools.product((False, True), repeat=2):
        if s:
            ts.apply_sparse_context(tiny_kv, sc)
        if t:
            ts.apply_token_merging(tiny_kv, tm)
        want[s, t] = gen(tiny_kv, refs, steps=2)
        clear(tiny_kv)
    assert len({tuple(v.flatten().tolist()) for v in want.values()}) == 4  # each method changes the output
    ops = {"as": (ts.apply_sparse_context, sc), "at": (ts.apply_token_merging, tm),
           "rs": (ts.remove_sparse_context,), "rt": (ts.remove_token_merging,)}
    for order in sorted(set(itertools.permutations(["as", "at", "rs", "rt", "as", "rt"], 5))):
        s = t = False
        for op in order:
            ops[op][0](tiny_kv, *ops[op][1:])
            s, t = {"as": (True, t), "rs": (False, t), "at": (s, True), "rt": (s, False)}[op]
        assert torch.equal(gen(tiny_kv, refs, steps=2), want[s, t]), order
        clear(tiny_kv)


@pytest.mark.parametrize("cache", [False, True])
def test_a_generation_selects_once_and_the_same_seed_gives_the_same_images(tiny_kv, monkeypatch, cache):
    import tokensparse.api as api

    calls, probes = [], []
    for name, scorer in list(SCORERS.items()):
        monkeypatch.setitem(SCORERS, name, lambda view, g, scorer=scorer, name=name: calls.append(name) or
                            scorer(view, g))
    probe = api.attention_probe
    monkeypatch.setattr(api, "attention_probe", lambda *a, **kw: probes.append(1) or probe(*a, **kw))
    refs, other = make_refs(3, batch=3, seed=2), make_refs(1, seed=5)
    for selector, guidance in itertools.product(sorted(SCORERS), GUIDANCE[:2] + GUIDANCE[4:5]):
        ts.apply_sparse_context(tiny_kv, ts.SparseContextConfig(keep=0.25, selector=selector, cache=cache))
        ts.apply_token_merging(tiny_kv, ts.TokenMergingConfig(threshold=0.2, recompute_every=2))
        calls.clear()
        probes.clear()
        first = gen(tiny_kv, refs, steps=4, seed=[3, 1, 4], guidance=guidance)
        assert calls.count(selector) == 3  # each reference scored once ("auto" through the scorer it picks)
        assert len(calls) == 3 * len(set(calls))
        assert len(probes) == (selector == "attention")  # the probe pass too: once per generation
        gen(tiny_kv, other, "recolor the red object blue", steps=2)  # another generation in between
        assert torch.equal(gen(tiny_kv, refs, steps=4, seed=[3, 1, 4], guidance=guidance), first), selector
    clear(tiny_kv)


@torch.no_grad()
def test_only_random_selection_depends_on_the_batch_and_never_on_the_other_samples_images(tiny_kv):
    refs = [r * 2 - 1 for r in make_refs(2, batch=3, seed=4)]
    others = [torch.cat([r[:1], s[1:]]) for r, s in zip(refs, (r * 2 - 1 for r in make_refs(2, batch=3, seed=9)))]
    prompts = ts.tokenize(PROMPTS)
    for selector in sorted(SCORERS):
        ts.apply_sparse_context(tiny_kv, ts.SparseContextConfig(keep=0.25, selector=selector))
        batch = tiny_kv.embed_references(refs, 3, prompts)
        alone = [tiny_kv.embed_references([r[i:i + 1] for r in refs], 1, prompts[i:i + 1]).ids[0] for i in range(3)]
        same = [torch.equal(a, b) for a, b in zip(alone, batch.ids)]
        assert all(same) if selector != "random" else not all(same), selector  # as SparseContextConfig.seed says
        assert torch.equal(tiny_kv.embed_references(others, 3, prompts).ids[0], batch.ids[0]), selector
    ts.remove_sparse_context(tiny_kv)


def test_count_and_keep_keep_the_same_tokens_where_they_name_the_same_number(tiny_kv):
    for selector, (k, allocate, min_keep), (n, batch) in itertools.product(
            sorted(SCORERS), ((4, "auto", 0.0), (8, "score", 0.25), (12, "equal", 0.0)), ((1, 1), (3, 3))):
        refs, outs = make_refs(n, batch=batch, seed=k), []
        for budget in ({"keep": k / 16}, {"count": k}):  # refdit-tiny: 16 tokens per reference
            ts.apply_sparse_context(tiny_kv, ts.SparseContextConfig(selector=selector, allocate=allocate,
                                                                    min_keep=min_keep, cache=True, **budget))
            outs.append(gen(tiny_kv, refs, PROMPT if batch == 1 else PROMPTS, steps=2))
        assert torch.equal(*outs), (selector, k, allocate, n)
    ts.remove_sparse_context(tiny_kv)


@torch.no_grad()
def test_references_of_other_sizes_than_the_target_through_the_reference_embedder(tiny_kv):
    # generate takes references of the model's image size only; the reference embedder and the model's forward
    # (pre-embedded tokens) take any grid, and Sparse Context selects on it all the same
    g = torch.Generator().manual_seed(0)
    sizes = [(8, 8), (24, 24), (12, 20), (20, 12)]
    for n, batch in ((1, 1), (2, 3), (4, 3)):
        refs = [torch.rand(batch, 3, *s, generator=g) * 2 - 1 for s in sizes[:n]]
        p, x, t = ts.tokenize(PROMPTS[:batch]), torch.randn(batch, 3, 16, 16, generator=g), torch.full((batch,), 0.6)
        ts.remove_sparse_context(tiny_kv)
        dense = tiny_kv(x, t, tiny_kv.ref_embedder(refs, prompt_ids=p), p)
        for selector in sorted(SCORERS):
            cfgs = [{"keep": 1.0}, {"keep": 0.25, "proportional": True}, {"count": 3, "allocate": "equal"}]
            cfgs += [{"adaptive": True, "mass": 0.5, "proportional": True}] if selector in INFORMED else []
            for cfg in cfgs:
                ts.apply_sparse_context(tiny_kv, ts.SparseContextConfig(selector=selector, **cfg))
                seq = tiny_kv.ref_embedder(refs, prompt_ids=p)
                out = tiny_kv(x, t, seq, p)
                assert torch.equal(out, tiny_kv(x, t, None, p, context_kv=tiny_kv.context_kv(seq, p)))
                assert not torch.equal(out, dense) if "keep" not in cfg or cfg["keep"] < 1 else torch.equal(out, dense)
    ts.remove_sparse_context(tiny_kv)
    same = [torch.rand(2, 3, 20, 28, generator=g) for _ in range(3)]  # 5 x 7 tokens each, unlike the target's 4 x 4
    masks = []
    for budget in ({"keep": 10 / 35}, {"count": 10}):
        ts.apply_sparse_context(tiny_kv, ts.SparseContextConfig(selector="edges", **budget))
        masks.append(tiny_kv.ref_embedder(same).ids)
    assert torch.equal(*masks) and masks[0].shape[1] == 30
    ts.remove_sparse_context(tiny_kv)


@torch.no_grad()
def test_sparse_flops_follow_the_kept_tokens_and_attention_is_counted(tiny_kv):
    cfg, b, n_refs = tiny_kv.config, 2, 4
    refs, p = [r * 2 - 1 for r in make_refs(n_refs, batch=b)], ts.tokenize([PROMPT] * b)
    x, t = torch.randn(b, 3, 16, 16), torch.full((b,), 0.5)
    nt, n_prompt, dh = cfg.grid ** 2, 1 + len(PROMPT.split()), cfg.dim // cfg.heads

    def forward_flops() -> tuple[int, int]:
        with flop_counter() as counter:
            tiny_kv(x, t, refs, p)
        sdpa = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "scaled_dot_product" in str(k))
        return int(counter.get_total_flops()), sdpa

    def sdpa_formula(n_ref_tokens: int) -> int:  # separate mode: context self-attention, target over all keys
        nc = n_prompt + n_ref_tokens
        return cfg.depth * 4 * b * cfg.heads * dh * (nc * nc + nt * (nt + nc))

    dense, dense_sdpa = forward_flops()
    assert dense_sdpa == sdpa_formula(n_refs * nt) > 0
    for keep in (0.25, 0.5, 0.75):
        ts.apply_sparse_context(tiny_kv, ts.SparseContextConfig(keep=keep, selector="uniform"))
        sparse, sparse_sdpa = forward_flops()
        kept = round(keep * nt) * n_refs
        assert sparse_sdpa == sdpa_formula(kept)
        tokens = (nt + n_prompt + kept) / (nt + n_prompt + n_refs * nt)  # what the per-token layers see
        assert sparse < dense and abs(sparse / dense - tokens) < 0.05, (keep, sparse / dense, tokens)
    ts.remove_sparse_context(tiny_kv)
    assert count_flops(lambda: tiny_kv(x, t, refs, p)) == dense


@pytest.mark.parametrize("name", ["refdit-sparse", "refdit-base"])
def test_the_shipped_models(name):
    from tokensparse.data import heldout

    model = ts.load_model(name)
    cache = not model.config.ref_attends_target
    sample = heldout("multi", 1)[0]
    dense = gen(model, sample.refs, sample.prompt, steps=2)
    ts.apply_sparse_context(model, ts.SparseContextConfig(keep=1.0, selector="auto", cache=cache))
    assert torch.equal(gen(model, sample.refs, sample.prompt, steps=2), dense)
    outs = []
    for cached in (False, True) if cache else (False,):
        ts.apply_sparse_context(model, ts.SparseContextConfig(keep=0.25, selector="auto", cache=cached,
                                                              proportional=True))
        ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.3))
        outs.append(gen(model, sample.refs, sample.prompt, steps=2, guidance=ts.CFGConfig(1.5)))
    assert all(torch.equal(outs[0], o) for o in outs) and not torch.equal(outs[0], dense)
    ts.remove_sparse_context(model)
    ts.remove_token_merging(model)
    assert torch.equal(gen(model, sample.refs, sample.prompt, steps=2), dense)
