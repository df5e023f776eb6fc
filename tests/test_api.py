"""The contract every apply_* keeps, for Sparse Context on RefDiT, plus generate()."""

import pytest
import torch

import tokensparse as ts
from tokensparse.selection import SCORERS

from .conftest import make_refs

PROMPT = "place the subject top left"


def gen(model, refs, **kw):
    return ts.generate(model, refs, PROMPT, steps=3, seed=0, **kw)


def test_same_seed_identical(tiny):
    refs = make_refs(2)
    assert torch.equal(gen(tiny, refs), gen(tiny, refs))


def test_output_range_and_shape(tiny):
    out = gen(tiny, make_refs(2, batch=2))
    assert out.shape == (2, 3, 16, 16) and out.min() >= 0 and out.max() <= 1


def test_keep_one_is_exact(tiny):
    refs = make_refs(3)
    dense = gen(tiny, refs)
    ts.apply_sparse_context(tiny, ts.SparseContextConfig(keep=1.0))
    assert torch.equal(gen(tiny, refs), dense)


def test_remove_restores_exactly_and_apply_replaces(tiny):
    refs = make_refs(2)
    dense = gen(tiny, refs)
    ts.apply_sparse_context(tiny, ts.SparseContextConfig(keep=0.25, seed=1))
    once = gen(tiny, refs)
    assert not torch.equal(once, dense)
    ts.apply_sparse_context(tiny, ts.SparseContextConfig(keep=0.25, seed=1))
    assert torch.equal(gen(tiny, refs), once)  # twice == once, no stacking
    assert len(tiny.ref_embedder._forward_hooks) == 1
    ts.remove_sparse_context(tiny)
    assert torch.equal(gen(tiny, refs), dense)
    ts.remove_sparse_context(tiny)  # removing twice is a no-op


@pytest.mark.parametrize("selector", sorted(SCORERS))
def test_token_count_at_quarter_keep_with_four_refs(tiny, selector):
    seen = []
    tiny.blocks[0].attn.register_forward_hook(lambda m, a, out: seen.append(a[2].shape[1]))
    ts.apply_sparse_context(tiny, ts.SparseContextConfig(keep=0.25, selector=selector))
    gen(tiny, make_refs(4))
    n_prompt = 1 + len(PROMPT.split())  # BOS + words (all-padding columns are dropped)
    assert set(seen) == {n_prompt + 4 * 4}  # 4 refs x (16 tokens * 0.25)
    assert len(seen) == 3  # one forward per step


def test_selection_is_identical_every_step(tiny):
    ids = []
    tiny.blocks[0].attn.register_forward_hook(lambda m, a, out: ids.append(a[3].clone()))
    ts.apply_sparse_context(tiny, ts.SparseContextConfig(keep=0.5, selector="random", seed=3))
    gen(tiny, make_refs(2))
    assert all(torch.equal(ids[0], x) for x in ids)


@pytest.mark.parametrize("kwargs, err", [
    (dict(keep=0.0), ValueError), (dict(keep=1.5), ValueError), (dict(keep=-0.1), ValueError),
    (dict(selector="magic"), ValueError), (dict(keep="half"), TypeError),
])
def test_bad_config(kwargs, err):
    with pytest.raises(err):
        ts.SparseContextConfig(**kwargs)


def test_a_count_that_keeps_every_token_is_refused_like_keep_above_one(tiny):
    refs = make_refs(2)
    dense = gen(tiny, refs)
    for count in (16, 40):  # refdit-tiny: 4x4 = 16 tokens per reference
        with pytest.raises(ValueError, match=f"count={count} keeps every one of this model's 16 tokens"):
            ts.apply_sparse_context(tiny, ts.SparseContextConfig(count=count))
    assert not tiny.ref_embedder._forward_hooks  # refused before anything was applied
    ts.apply_sparse_context(tiny, ts.SparseContextConfig(count=15, selector="uniform"))
    assert not torch.equal(gen(tiny, refs), dense)
    ts.remove_sparse_context(tiny)
    one = ts.build_model("refdit-tiny", image_size=4)  # one token per reference: "give a count below 1" was the hint
    with pytest.raises(ValueError, match="one token per reference no count drops any") as err:
        ts.apply_sparse_context(one, ts.SparseContextConfig(count=1))
    assert "below 1" not in str(err.value)


def test_numpy_scalars_are_accepted_and_the_config_is_snapshotted(tiny):
    import numpy as np

    cfg = ts.SparseContextConfig(keep=np.float32(0.5), seed=np.int64(3), selector="random")
    assert type(cfg.keep) is float and cfg.keep == 0.5 and type(cfg.seed) is int
    ts.apply_sparse_context(tiny, cfg)
    before = gen(tiny, make_refs(2))
    cfg.keep = 1.0  # editing the caller's object after apply changes nothing
    assert torch.equal(gen(tiny, make_refs(2)), before)


def test_the_applied_config_read_back_is_a_copy(tiny):
    from tokensparse.api import sparse_context_config

    ts.apply_sparse_context(tiny, ts.SparseContextConfig(keep=0.5, selector="uniform"))
    before = gen(tiny, make_refs(2))
    read = sparse_context_config(tiny)
    assert read == ts.SparseContextConfig(keep=0.5, selector="uniform")
    read.keep, read.selector = 0.1, "random"  # it was the hook's own object: the next generation kept 10 %
    assert torch.equal(gen(tiny, make_refs(2)), before) and sparse_context_config(tiny).keep == 0.5
    ts.remove_sparse_context(tiny)
    assert sparse_context_config(tiny) is None


@pytest.mark.parametrize("kwargs, err", [
    (dict(shift=0.0), ValueError), (dict(shift=float("nan")), ValueError), (dict(steps=2.5), TypeError),
    (dict(steps=True), TypeError), (dict(seed=[]), ValueError), (dict(seed=2**70), ValueError),
    (dict(seed="1"), TypeError), (dict(seed=None), TypeError), (dict(steps=0), ValueError),
])
def test_generate_rejects_bad_settings(tiny, kwargs, err):
    with pytest.raises(err):
        ts.generate(tiny, make_refs(1), "place", **{"steps": 2, **kwargs})


def test_generate_rejects_missing_prompt_or_references(tiny):
    with pytest.raises(TypeError, match="prompt"):
        ts.generate(tiny, make_refs(1), None, steps=2)
    with pytest.raises(TypeError, match="references"):
        ts.generate(tiny, None, "place", steps=2)


def test_bad_targets_and_inputs(tiny):
    with pytest.raises(TypeError, match="RefDiT"):
        ts.apply_sparse_context(torch.nn.Linear(2, 2), ts.SparseContextConfig(keep=0.5))
    with pytest.raises(TypeError, match="SparseContextConfig"):
        ts.apply_sparse_context(tiny, {"keep": 0.5})
    with pytest.raises(ValueError, match="vocabulary"):
        ts.generate(tiny, make_refs(1), "paint a unicorn", steps=1)
    with pytest.raises(ValueError, match="at most 4"):
        ts.generate(tiny, make_refs(5), PROMPT, steps=1)
    with pytest.raises(ValueError, match="16x16"):
        ts.generate(tiny, make_refs(1, size=8), PROMPT, steps=1)
    with pytest.raises(ValueError, match="cache=True"):
        ts.apply_sparse_context(tiny, ts.SparseContextConfig(keep=0.5, cache=True))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, on importing its compiler
def test_a_torch_compile_wrapper_is_refused_with_the_way_out(tiny):
    # the message ended "got OptimizedModule" after the list of pipelines, as ts.generate's did before it gave a hint
    compiled = torch.compile(tiny)
    for method in (ts.apply_sparse_context, ts.remove_sparse_context):
        args = (ts.SparseContextConfig(keep=0.5),) if method is ts.apply_sparse_context else ()
        with pytest.raises(TypeError, match=r"got OptimizedModule: pass the RefDiT itself \(compile in place with "
                                            r"\.compile\(\) instead of torch\.compile\(\.\.\.\)\)"):
            method(compiled, *args)
    assert not tiny.ref_embedder._forward_hooks
    with pytest.raises(TypeError, match=r"got OptimizedModule: pass the RefDiT itself"):  # token merging alike
        ts.apply_token_merging(compiled, ts.TokenMergingConfig(ratio=0.5))
    cfgs = {ts.apply_sparse_context: ts.SparseContextConfig(keep=0.5),
            ts.apply_token_merging: ts.TokenMergingConfig(ratio=0.5)}
    for method, cfg in cfgs.items():  # no hint where the wrapped model is refused too
        with pytest.raises(TypeError) as err:
            method(torch.compile(torch.nn.Linear(2, 2)), cfg)
        assert str(err.value).endswith("got OptimizedModule"), str(err.value)


def test_pil_references_accepted(tiny):
    from tokensparse.images import to_pil

    refs = make_refs(1)
    a = gen(tiny, [to_pil(refs[0][0])])
    b = gen(tiny, [(torch.round(refs[0][0] * 255) / 255)])
    assert torch.allclose(a, b, atol=1e-6)


def test_kv_cache_generation_is_exact_and_stacks_with_sparsity(tiny_kv):
    refs = make_refs(3)
    for keep in (1.0, 0.25):
        ts.apply_sparse_context(tiny_kv, ts.SparseContextConfig(keep=keep, selector="uniform"))
        plain = gen(tiny_kv, refs)
        ts.apply_sparse_context(tiny_kv, ts.SparseContextConfig(keep=keep, selector="uniform", cache=True))
        seen = []
        hook = tiny_kv.blocks[0].mlp.register_forward_hook(
            lambda m, a, kw, out, seen=seen: seen.append(kw.get("role")), with_kwargs=True)
        cached = gen(tiny_kv, refs)
        hook.remove()
        assert torch.equal(plain, cached)
        assert seen.count("context") == 1 and seen.count("target") == 3  # context stream ran once
    ts.remove_sparse_context(tiny_kv)


@pytest.mark.parametrize("selector", ["auto", "attention"])
def test_every_model_entry_point_selects_with_its_own_prompt(tiny_kv, selector):
    refs, x, t = [r * 2 - 1 for r in make_refs(2, batch=2)], torch.randn(2, 3, 16, 16), torch.full((2,), 0.7)
    prompts = ts.tokenize(["place the subject", "recolor the red object blue"])
    ts.apply_sparse_context(tiny_kv, ts.SparseContextConfig(keep=0.25, selector=selector, cache=True))
    try:
        with torch.no_grad():
            kept, null_kept = (tiny_kv.embed_references(refs, 2, p).ids for p in (prompts, None))
            assert selector == "attention" or not torch.equal(kept, null_kept)  # auto: the prompt names the task
            cached = tiny_kv(x, t, None, prompts, context_kv=tiny_kv.context_kv(refs, prompts))
            assert torch.equal(cached, tiny_kv(x, t, refs, prompts))  # context_kv selects as forward does
            tiny_kv.ref_embedder(refs)  # a direct call: the null prompt, as before
    finally:
        ts.remove_sparse_context(tiny_kv)


def test_generate_checks_its_arguments_before_any_work(tiny):
    refs = make_refs(1)
    for kwargs, err, message in (
        (dict(references=torch.rand(2, 3, 32, 32)), TypeError, "references must be a list"),
        (dict(prompt=3), TypeError, "prompt"), (dict(prompt=[]), TypeError, "prompt"),
        (dict(sampler=["euler"]), TypeError, "sampler"), (dict(callback=3), TypeError, "callback"),
        (dict(seed=[0, 1]), ValueError, "2 seeds for a batch of 1"),
        (dict(guidance=ts.SparseGuidanceConfig()), ValueError, "route_span"),
    ):
        args = {"references": refs, "prompt": "place", **kwargs}
        with pytest.raises(err, match=message):
            ts.generate(tiny, args.pop("references"), args.pop("prompt"), steps=1, **args)
    edited = ts.CFGConfig()
    edited.scale = float("nan")  # edited after construction: checked again
    with pytest.raises(ValueError, match="scale must be finite"):
        ts.generate(tiny, refs, "place", steps=1, guidance=edited)
    with pytest.raises(ValueError, match="float32"):
        ts.generate(ts.build_model("refdit-tiny").double(), refs, "place", steps=1)


def test_a_deepcopy_of_a_patched_model_probes_with_its_own_weights_and_a_patched_model_pickles(tiny):
    import copy
    import io

    from .conftest import randomize

    cfg = ts.SparseContextConfig(keep=0.25, selector="attention")
    refs = make_refs(2)
    ts.apply_sparse_context(tiny, cfg)
    twin = copy.deepcopy(tiny)
    torch.manual_seed(7)
    fresh = ts.apply_sparse_context(randomize(ts.build_model("refdit-tiny"), seed=7), cfg)  # other weights
    twin.load_state_dict(fresh.state_dict())
    want = ts.generate(fresh, refs, "place", steps=2, seed=0)
    assert torch.equal(ts.generate(twin, refs, "place", steps=2, seed=0), want)  # the twin's probe, not tiny's
    buf = io.BytesIO()
    torch.save(twin, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # our own bytes, written just above
    assert torch.equal(ts.generate(loaded, refs, "place", steps=2, seed=0), want)
    ts.remove_sparse_context(loaded)
    assert torch.equal(ts.generate(loaded, refs, "place", steps=2, seed=0),
                       ts.generate(ts.remove_sparse_context(fresh), refs, "place", steps=2, seed=0))


@pytest.mark.filterwarnings("ignore::UserWarning:torch")  # dynamo's notes on tracing the hooks
@torch.no_grad()
def test_sparse_context_applied_to_a_compiled_model_takes_effect(tiny, caplog):
    import logging

    refs, p, x = [r * 2 - 1 for r in make_refs(2)], ts.tokenize("place"), torch.randn(1, 3, 16, 16)
    dense = tiny(x, 0.5, refs, p)
    ts.apply_sparse_context(tiny, ts.SparseContextConfig(keep=0.25))
    sparse = tiny(x, 0.5, refs, p)
    ts.remove_sparse_context(tiny)
    tiny.compile(backend="eager")  # the reference embedder's hook runs inside the compiled forward
    assert torch.equal(tiny(x, 0.5, refs, p), dense)
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        ts.apply_sparse_context(tiny, ts.SparseContextConfig(keep=0.25))
    assert "torch.compiler.reset()" in caplog.text
    assert torch.equal(tiny(x, 0.5, refs, p), sparse)
    ts.remove_sparse_context(tiny)
    assert torch.equal(tiny(x, 0.5, refs, p), dense)


def test_the_largest_numpy_seed_works_for_a_batch(tiny):
    import numpy as np

    out = ts.generate(tiny, [], ["place", "place"], steps=1, seed=np.int64(2**63 - 1))  # seed + 1 must not wrap
    assert torch.equal(out, ts.generate(tiny, [], ["place", "place"], steps=1, seed=2**63 - 1))  # as a Python int
    assert not torch.equal(out[0], out[1])


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's RMSNorm under autocast
@pytest.mark.parametrize("selector", ["random", "auto"])
def test_proportional_sparse_context_is_exact_cached_and_changes_only_sparse_runs(tiny_kv, selector):
    refs = make_refs(3)
    dense = gen(tiny_kv, refs)
    ts.apply_sparse_context(tiny_kv, ts.SparseContextConfig(keep=1.0, proportional=True, cache=True))
    assert torch.equal(gen(tiny_kv, refs), dense)  # keep 1.0: every token stands for itself
    cfg = {"keep": 0.25, "selector": selector}
    outs = {}
    for prop, cache in ((False, False), (True, False), (True, True)):
        ts.apply_sparse_context(tiny_kv, ts.SparseContextConfig(**cfg, proportional=prop, cache=cache))
        outs[prop, cache] = gen(tiny_kv, refs)
    assert torch.equal(outs[True, True], outs[True, False])  # the cache stays exact with the logit bias
    assert not torch.allclose(outs[True, False], outs[False, False], atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a float bias beside reduced-precision activations
        assert torch.isfinite(gen(tiny_kv, refs)).all()
    ts.remove_sparse_context(tiny_kv)
    assert torch.equal(gen(tiny_kv, refs), dense)
    with pytest.raises(TypeError, match="proportional"):
        ts.SparseContextConfig(keep=0.5, proportional="yes")


def test_the_attention_probe_does_not_depend_on_the_default_dtype(tiny_kv):
    # the probe drew its noise and time in the default dtype: float64 ones into the float32 model raised
    ts.apply_sparse_context(tiny_kv, ts.SparseContextConfig(keep=0.5, selector="attention", adaptive=True))
    refs = make_refs(2)
    want = gen(tiny_kv, refs)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = gen(tiny_kv, refs)
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(got, want)
