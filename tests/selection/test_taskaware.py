"""Prompt-aware selection, the attention probe, and the budget options through the public API."""

import math

import pytest
import torch

import tokensparse as ts
from tokensparse.api import PROBE_SEED, PROBE_T, attention_probe
from tokensparse.selection import FAMILY_SCORER, RefView, auto_choice, prompt_family, select
from tokensparse.selection.auto import plain_border

from ..conftest import make_refs


@pytest.mark.parametrize("prompt, family", [
    ("recolor the red object blue", "editing"), ("remove the red object", "editing"), ("relight warm", "editing"),
    ("place subject top left large on blue stripes", "subject"), ("background green dots", "subject"),
    ("compose first top left second center right on red plain", "multi"),
    ("compose second top left on first", "multi"), ("", None), ("a cat", None),
])
def test_prompt_family(prompt, family):
    assert prompt_family(prompt) == family


@pytest.mark.parametrize("prompt, family", [
    ("Recolor.", "editing"), ("remove; then relight", "editing"), ('"compose" the first and second', "multi"),
    ("(place) the subject", "subject"), ("Edit: make it red", "editing"), ("a cat, a dog.", None),
])
def test_prompt_family_reads_words_through_punctuation(prompt, family):
    # only commas were split off: "Recolor." or '"compose"' named no family and auto fell back to its image rule
    assert prompt_family(prompt) == family
    with pytest.raises(TypeError, match="prompt must be a string"):
        prompt_family(["recolor"])


def test_plain_border_tells_subjects_from_photos():
    subj = torch.full((2, 4, 4, 48), 0.3)
    subj[:, 1:3, 1:3] = torch.rand(2, 2, 2, 48)
    photo = torch.rand(2, 4, 4, 48)
    assert plain_border(subj).all() and not plain_border(photo).any()


def test_auto_choice_per_sample():
    feats = torch.rand(3, 4, 4, 48)
    feats[2] = 0.3  # a plain reference
    v = RefView(features=feats, prompts=["relight warm", "place subject top left large on blue stripes", "a b"])
    assert auto_choice(v) == [FAMILY_SCORER["editing"], FAMILY_SCORER["subject"], FAMILY_SCORER["subject"]]
    scene = RefView(features=torch.rand(1, 4, 4, 48), prompts=["compose second top left on first"])
    assert auto_choice(scene) == [FAMILY_SCORER["editing"]]  # a photo among subjects is copied like an edit


def test_auto_adaptive_on_an_edit_keeps_a_fixed_fraction_whatever_the_image():
    """What the docs say: ``auto`` scores an edit with ``uniform``'s content-free ranks, so an adaptive budget keeps
    44 of 64 tokens at mass 0.9 on any image (on a subject it adapts to the content)."""
    g = torch.Generator().manual_seed(0)
    flat, busy = torch.zeros(1, 8, 8, 3), torch.rand(1, 8, 8, 3, generator=g)
    edits = [select([RefView(f, prompts=["recolor the car red"])], 1.0, "auto", g, adaptive=True, mass=0.9)[0]
             for f in (flat, busy)]
    assert int(edits[0].sum()) == int(edits[1].sum()) == 44 and torch.equal(edits[0], edits[1])
    subject = select([RefView(busy, prompts=["place the subject top left"])], 1.0, "auto", g, adaptive=True)[0]
    assert int(subject.sum()) != 44


def _ref_mass_from_hooks(model, refs_seq, prompt_ids, blocks):
    """Reference: run the real forward on the probe's input and compute the attention from hooked inputs."""
    cfg = model.config
    b = refs_seq.tokens.shape[0]
    x = torch.randn(1, cfg.channels, cfg.image_size, cfg.image_size,
                    generator=torch.Generator().manual_seed(PROBE_SEED)).expand(b, -1, -1, -1)
    seen = []

    def hook(mod, args, kwargs, out):
        h, x_rope, ctx, ctx_rope, ctx_valid = args[:5]
        qx, kx, _ = mod.qkv_heads(h, x_rope)
        kc = mod.qkv_heads(ctx, ctx_rope)[1] if ctx is not None else kwargs["ctx_kv"][0]
        logits = qx @ torch.cat([kx, kc], 2).transpose(-1, -2) / math.sqrt(mod.head_dim)
        if ctx_valid is not None and ctx_valid.dtype == torch.bool:
            keep = torch.cat([torch.ones(b, h.shape[1], dtype=torch.bool), ctx_valid], 1)
            logits = logits.masked_fill(~keep[:, None, None], float("-inf"))
        elif ctx_valid is not None:  # log-size biases (proportional Sparse Context)
            logits = logits + torch.cat([torch.zeros(b, h.shape[1]), ctx_valid], 1)[:, None, None]
        seen.append(logits.softmax(-1)[..., -refs_seq.tokens.shape[1]:].mean((1, 2)))

    handles = [blk.attn.register_forward_hook(hook, with_kwargs=True) for blk in model.blocks[:blocks]]
    with torch.no_grad():
        model(x, torch.full((b,), PROBE_T), refs_seq, prompt_ids)
    for hd in handles:
        hd.remove()
    return torch.stack(seen).mean(0)


@pytest.mark.parametrize("sized", [False, True])
@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("kind", ["tiny", "tiny_kv"])
def test_attention_probe_matches_the_real_forward(request, kind, blocks, sized):
    tiny = request.getfixturevalue(kind)
    refs = [r * 2 - 1 for r in make_refs(2, batch=2)]
    prompt_ids = ts.tokenize(["place subject top left", "relight warm"], tiny.config.max_prompt_len)
    with torch.no_grad():
        seq = tiny.embed_references(refs, 2)
        if sized:  # tokens standing for several (TokenSeq.sizes): the probe biases their logits as the model does
            seq.sizes = torch.randint(1, 4, seq.tokens.shape[:2], generator=torch.Generator().manual_seed(0)).float()
        probe = attention_probe(tiny, seq, prompt_ids, blocks=blocks)
    expected = _ref_mass_from_hooks(tiny, seq, prompt_ids, blocks)
    assert probe.shape == (2, 32) and bool((probe >= 0).all())
    assert torch.allclose(probe, expected, atol=1e-6)


def test_attention_probe_runs_once_per_generation_and_skips_other_hooks(tiny):
    calls = []
    tiny.blocks[0].attn.register_forward_hook(lambda m, a, o: calls.append(1))
    from tokensparse import api

    probes = []
    original = api.attention_probe
    api.attention_probe = lambda *a, **k: probes.append(1) or original(*a, **k)
    try:
        ts.apply_sparse_context(tiny, ts.SparseContextConfig(keep=0.25, selector="attention"))
        ts.generate(tiny, make_refs(2), "place subject top left", steps=3)
    finally:
        api.attention_probe = original
        ts.remove_sparse_context(tiny)
    assert len(probes) == 1 and len(calls) == 3  # the probe does not go through the blocks' hooks


def _kept_ids(model, refs, prompt, cfg):
    ids = []
    h = model.blocks[0].attn.register_forward_hook(lambda m, a, o: ids.append(a[3].clone()))
    ts.apply_sparse_context(model, cfg)
    ts.generate(model, refs, prompt, steps=1)
    ts.remove_sparse_context(model)
    h.remove()
    return ids[0]


def test_auto_follows_the_prompt_through_generate(tiny):
    refs = make_refs(1)
    for prompt, family in (("relight warm", "editing"), ("place subject top left", "subject")):
        auto = _kept_ids(tiny, refs, prompt, ts.SparseContextConfig(keep=0.25, selector="auto"))
        direct = _kept_ids(tiny, refs, prompt, ts.SparseContextConfig(keep=0.25, selector=FAMILY_SCORER[family]))
        assert torch.equal(auto, direct)


def test_prompt_reaches_selection_in_a_plain_forward(tiny):
    seen = []
    import tokensparse.selection.auto as auto_mod

    original = auto_mod.auto_choice
    auto_mod.auto_choice = lambda v: seen.append(list(v.prompts)) or original(v)
    try:
        ts.apply_sparse_context(tiny, ts.SparseContextConfig(keep=0.5, selector="auto"))
        refs = [r * 2 - 1 for r in make_refs(1)]
        with torch.no_grad():
            tiny(torch.zeros(1, 3, 16, 16), torch.ones(1), refs, ts.tokenize("relight warm", 16))
    finally:
        auto_mod.auto_choice = original
        ts.remove_sparse_context(tiny)
    assert seen == [["relight warm"]]
    assert "_tokensparse_prompt_ids" not in tiny.__dict__


@pytest.mark.parametrize("cfg", [
    {"keep": 0.5, "selector": "foreground", "adaptive": True, "mass": 0.8},
    {"selector": "edges", "count": 3},
    {"keep": 0.25, "selector": "foreground", "allocate": "score", "min_keep": 0.1},
])
def test_budget_options_through_generate(tiny, cfg):
    counts = []
    tiny.blocks[0].attn.register_forward_hook(lambda m, a, o: counts.append(a[2].shape[1]))
    ts.apply_sparse_context(tiny, ts.SparseContextConfig(**cfg))
    out = ts.generate(tiny, make_refs(3), "place subject top left", steps=2)
    ts.remove_sparse_context(tiny)
    assert out.shape == (1, 3, 16, 16) and len(set(counts)) == 1
    n_ref = counts[0] - 5  # BOS + 4 words
    if "count" in cfg:
        assert n_ref == 9
    elif cfg.get("allocate") == "score":
        assert n_ref == 12
    else:
        assert 3 <= n_ref <= 24


def test_keep_one_with_other_options_is_still_exact(tiny):
    refs = make_refs(2)
    dense = ts.generate(tiny, refs, "relight warm", steps=2)
    ts.apply_sparse_context(tiny, ts.SparseContextConfig(keep=1.0, selector="auto", allocate="score"))
    assert torch.equal(ts.generate(tiny, refs, "relight warm", steps=2), dense)
    ts.remove_sparse_context(tiny)


@pytest.mark.parametrize("kwargs, err", [
    ({"count": 0}, ValueError), ({"count": 2.5}, TypeError), ({"count": 4, "keep": 0.5}, ValueError),
    ({"count": 4, "adaptive": True}, ValueError), ({"mass": 0.0}, ValueError), ({"mass": 1.5}, ValueError),
    ({"mass": "a"}, TypeError), ({"min_keep": 0.6, "keep": 0.5}, ValueError), ({"min_keep": -0.1}, ValueError),
    ({"allocate": "fair"}, ValueError), ({"adaptive": 1}, TypeError),
])
def test_bad_budget_config(kwargs, err):
    with pytest.raises(err):
        ts.SparseContextConfig(**kwargs)


@pytest.mark.parametrize("selector", ["random", "uniform", "detail"])
def test_adaptive_budgets_need_an_informed_selector(selector):
    with pytest.raises(ValueError, match="informed selectors"):  # equal scores: "mass" would be a token count
        ts.SparseContextConfig(selector=selector, adaptive=True)
    v = RefView(features=torch.rand(1, 4, 4, 3))
    with pytest.raises(ValueError, match="informed selectors"):
        select([v], 1.0, selector, torch.Generator(), adaptive=True)


def test_identity_flags():
    assert ts.SparseContextConfig().is_identity
    assert not ts.SparseContextConfig(selector="edges", adaptive=True).is_identity
    assert not ts.SparseContextConfig(count=4).is_identity
