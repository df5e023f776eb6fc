import pytest
import torch

import tokensparse as ts

from .conftest import make_refs, randomize


def test_generation_does_not_depend_on_the_default_dtype():
    # noise, times, routing and weak-branch reference draws are float32 whatever torch's default dtype is:
    # a float64 default made generate crash (float64 noise into a float32 model) and changed every draw
    torch.manual_seed(0)
    model = randomize(ts.build_model("refdit-tiny", ref_attends_target=False, route_span=(0, 2)))
    ts.apply_sparse_context(model, ts.SparseContextConfig(keep=0.5, selector="auto", cache=True))
    refs = make_refs(1)
    kw = dict(steps=2, shift=1.7, seed=3, guidance=ts.SparseGuidanceConfig(2.0, 0.0, 0.5, weak_keep=0.5))
    want = ts.generate(model, refs, "place red object", **kw)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = ts.generate(model, refs, "place red object", **kw)
    finally:
        torch.set_default_dtype(previous)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, on importing its compiler
def test_a_torch_compile_wrapper_is_refused_with_the_way_out():
    model = ts.build_model("refdit-s").eval()
    with pytest.raises(TypeError, match=r"got OptimizedModule: pass the RefDiT itself .*model\.compile\(\)"):
        ts.generate(torch.compile(model), [], "scene red object on blue dots", steps=1)


def test_random_selection_draws_the_same_tokens_whatever_the_default_dtype():
    from tokensparse.selection.scorers import RefView, score_random

    view = RefView(torch.zeros(1, 4, 4, 3))
    draw = score_random(view, torch.Generator().manual_seed(0))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        again = score_random(view, torch.Generator().manual_seed(0))
    finally:
        torch.set_default_dtype(default)
    assert again.dtype == torch.float32 and torch.equal(again, draw)


def test_a_model_whose_weights_are_not_loaded_is_named_before_any_work():
    # a model built under torch.device("meta") failed deep in the sampler ("Tensor.item() cannot be called on meta
    # tensors"); one loaded with assign=True kept its meta target_ids, and to_empty() left them uninitialised:
    # the images came out silently wrong
    with torch.device("meta"):
        meta = ts.build_model("refdit-tiny")
    with pytest.raises(ValueError, match=r"model \(a RefDiT\) has its weights on the meta device \(not loaded\): "
                                         r"\d+ of its \d+ parameters, e.g. patch_embed.weight"):
        ts.generate(meta, make_refs(1), "place", steps=1)
    torch.manual_seed(0)
    state = randomize(ts.build_model("refdit-tiny")).state_dict()
    meta.load_state_dict(state, assign=True)
    with pytest.raises(ValueError, match="buffer target_ids on the meta device: it is made when the model is built"):
        ts.generate(meta, make_refs(1), "place", steps=1)
    with torch.device("meta"):
        empty = ts.build_model("refdit-tiny")
    empty = empty.to_empty(device="cpu")
    empty.load_state_dict(state)
    empty.target_ids.fill_(7)  # to_empty's memory: whatever was there
    with pytest.raises(ValueError, match="buffer target_ids holding other values than the target's position ids"):
        ts.generate(empty, make_refs(1), "place", steps=1)


def test_a_model_with_other_channel_counts_takes_references_with_its_own():
    # every reference was made RGB, so a RefDiT built with channels=1 or 4 refused any reference ("reference 0 has
    # shape (1, 3, 16, 16); expected (B, 1, H, W)") even one with its own channel count
    import numpy as np
    from PIL import Image

    for channels, mode in ((1, "L"), (4, "RGBA")):
        torch.manual_seed(0)
        model = randomize(ts.build_model("refdit-tiny", channels=channels, ref_attends_target=False))
        ref = torch.rand(channels, 16, 16, generator=torch.Generator().manual_seed(1)).mul(255).round().div(255)
        u8 = (ref * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, C)
        dense = ts.generate(model, [ref], "place", steps=2)
        assert dense.shape == (1, channels, 16, 16)
        assert not torch.equal(dense, ts.generate(model, [], "place", steps=2))  # the reference is seen
        pil = Image.fromarray(u8[..., 0] if channels == 1 else u8, mode)
        for same in (u8, torch.from_numpy(u8), ref[None], pil):  # (H, W, C) uint8, a batch, a PIL image
            assert torch.allclose(ts.generate(model, [same], "place", steps=2), dense, atol=1e-6)
        pair = ts.generate(model, [torch.stack([ref, ref.flip(-1)])], ["place", "place"], steps=2)
        assert torch.allclose(pair[:1], dense, atol=1e-5)  # batch-independent noise: sample 0 as alone
        sparse = ts.SparseContextConfig(keep=0.5, selector="auto", cache=True, proportional=True)
        ts.apply_sparse_context(model, sparse)
        ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
        guided = ts.generate(model, [ref], "place", steps=2, guidance=ts.SparseGuidanceConfig(2.0, 0, 0, weak_keep=0.5))
        assert guided.shape == dense.shape and not torch.allclose(guided, dense, atol=1e-4)
        ts.remove_token_merging(model)
        ts.remove_sparse_context(model)
        assert torch.equal(ts.generate(model, [ref], "place", steps=2), dense)
        with pytest.raises(ValueError, match=rf"reference 1 has shape \(3, 16, 16\); this model takes {channels}-"):
            ts.generate(model, [ref, torch.rand(3, 16, 16)], "place", steps=1)
        with pytest.raises(ValueError, match="reference 0 is a PIL image in mode 'RGB'; this model takes"):
            ts.generate(model, [pil.convert("RGB")], "place", steps=1)
        with pytest.raises(ValueError, match=r"reference 0: image values must be in \[0, 1\]"):
            ts.generate(model, [ref * 2], "place", steps=1)
    gray = np.full((16, 16), 128, dtype=np.uint8)
    rgb = ts.generate(randomize(ts.build_model("refdit-tiny")), [Image.fromarray(gray)], "place", steps=1)
    assert rgb.shape == (1, 3, 16, 16)  # an RGB model still takes a grayscale reference, made RGB


def test_a_routing_rate_that_routes_every_target_token_and_a_bad_seed_are_named_before_any_work():
    import numpy as np

    model = randomize(ts.build_model("refdit-tiny", ref_attends_target=False, route_span=(0, 2)))  # 16 tokens
    calls = []
    model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    for name, kw in (("weak", dict(strong=0.0, weak=0.97)), ("strong", dict(strong=0.99, weak=0.99, null_weak=True))):
        # the first step failed with the layer's "route 0.97 routes all 16 target tokens", naming no argument
        with pytest.raises(ValueError, match=rf"guidance {name}=0.9\d routes all 16 target tokens of this model "
                                             r"around its route span; give a rate below 0.9688"):
            ts.generate(model, [], "place", steps=2, guidance=ts.SparseGuidanceConfig(**kw))
    for seed, err, message in ((np.arange(2), TypeError, "seed must be an int or a list of ints, got ndarray"),
                               (range(2), TypeError, "seed must be an int or a list of ints, got range"),
                               ([0, np.array([1])], TypeError, r"seed\[1\] must be an int, got a numpy array of "
                                                                r"shape \(1,\)"),
                               ([0, -1], ValueError, r"seed\[1\] must be in \[0, ")):
        with pytest.raises(err, match=message):
            ts.generate(model, [], ["place", "place"], steps=1, seed=seed)
    assert not calls
    # a 0-d tensor seed reads as its int, as in the configs (it was "seed must be an int or a list of ints")
    assert torch.equal(ts.generate(model, [], "place", steps=1, seed=torch.tensor(3)),
                       ts.generate(model, [], "place", steps=1, seed=3))
    # so does a 0-d numpy array, as a numpy int does (np.array(1) was "must be an int, got ndarray")
    assert torch.equal(ts.generate(model, [], ["place", "place"], steps=1, seed=np.array(3)),
                       ts.generate(model, [], ["place", "place"], steps=1, seed=[np.int64(3), np.array(4)]))
    out = ts.generate(model, [], "place", steps=1, guidance=ts.SparseGuidanceConfig(strong=0.0, weak=0.96))
    assert out.shape == (1, 3, 16, 16)  # 0.96 of 16 tokens routes 15: one goes through the span


def test_a_reference_batch_that_fits_neither_the_prompts_nor_the_other_references_is_named():
    # the model's check said "reference 0 has batch 2; the target has batch 3", a target the caller never gave
    model = randomize(ts.build_model("refdit-tiny"))
    with pytest.raises(ValueError, match=r"reference 0 is a batch of 2 images, but this call's batch is 3 "
                                         r"\(prompts: 3, images per reference: \[2\]\): give each reference 1 image"):
        ts.generate(model, make_refs(1, batch=2), ["place"] * 3, steps=1)
    with pytest.raises(ValueError, match=r"reference 1 is a batch of 2 .* \(prompts: 1, images per reference: "
                                         r"\[1, 2, 3\]\)"):
        ts.generate(model, make_refs(1) + make_refs(1, batch=2) + make_refs(1, batch=3), "place", steps=1)


def test_an_empty_reference_batch_is_named_as_empty():
    # a (0, 3, H, W) reference got the generic "must be (H, W), ..." shape message, not that it holds no image
    model = randomize(ts.build_model("refdit-tiny"))
    with pytest.raises(ValueError, match=r"reference 0: got an empty batch of images \(zero images, shape "
                                         r"\(0, 3, 16, 16\)\)"):
        ts.generate(model, [torch.rand(0, 3, 16, 16)], "place", steps=1)


@pytest.mark.parametrize("cache", [False, True])
def test_a_generation_prepares_each_context_once(tiny, tiny_kv, monkeypatch, cache):
    # the prompt's encoding, the context's RoPE table and mask were recomputed at every step (and guidance pass)
    model = tiny_kv if cache else tiny
    ts.apply_sparse_context(model, ts.SparseContextConfig(keep=0.5, cache=cache))
    calls = []
    original = type(model).context
    monkeypatch.setattr(type(model), "context", lambda self, *a: calls.append(1) or original(self, *a))
    ts.generate(model, make_refs(2), "place the subject top left", steps=4, guidance=ts.CFGConfig(2.0))
    assert len(calls) == 2  # the conditional and the null prompt's contexts, once each


def test_the_callback_may_steer_the_sample_and_a_looking_one_needs_no_copy():
    """generate's callback gets the live sample: an in-place edit or a returned sample is what the next step continues
    from (as diffusers' callback_on_step_end changes latents); one that only keeps the samples sees each unchanged."""
    torch.manual_seed(0)
    model = randomize(ts.build_model("refdit-tiny"))
    refs = make_refs(1)
    kept = []
    plain = ts.generate(model, refs, "place red object", steps=3, callback=lambda i, x: kept.append(x))
    copies = []
    ts.generate(model, refs, "place red object", steps=3, callback=lambda i, x: copies.append(x.clone()))
    assert all(torch.equal(a, b) for a, b in zip(kept, copies)) and len(kept) == 3
    assert torch.equal(plain, ((kept[-1] + 1) / 2).clamp(0, 1))
    for steer in (lambda i, x: x.zero_() if i == 2 else None, lambda i, x: torch.zeros_like(x) if i == 2 else None):
        assert torch.equal(ts.generate(model, refs, "place red object", steps=3, callback=steer),
                           torch.full_like(plain, 0.5))
    first = ts.generate(model, refs, "place red object", steps=3, callback=lambda i, x: x.neg() if i == 0 else None)
    assert not torch.equal(first, plain)



def test_a_step_count_past_max_steps_is_named_before_any_work():
    model = randomize(ts.build_model("refdit-tiny"))
    calls = []
    model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    # the allocator's "can't allocate memory: you tried to allocate 4000000000004 bytes", after the selection
    with pytest.raises(ValueError, match=r"steps must be in \[1, 100000\], got 1000000000000"):
        ts.generate(model, [], "place", steps=10**12)
    assert not calls


def test_weak_keep_refusal_does_not_ask_for_a_smaller_weak_keep_where_none_drops_anything(tiny):
    ref = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    guidance = ts.SparseGuidanceConfig(2.0, 0.0, 0.0, weak_keep=0.1)
    ts.apply_sparse_context(tiny, ts.SparseContextConfig(count=1))  # one token per reference is all the model sees
    with pytest.raises(ValueError, match="1 or fewer each") as exc:
        ts.generate(tiny, [ref], "place", steps=1, guidance=guidance)
    assert "smaller weak_keep" not in str(exc.value) and "only token" in str(exc.value)  # none can drop it
    ts.apply_sparse_context(tiny, ts.SparseContextConfig(count=2))
    with pytest.raises(ValueError, match="give a smaller weak_keep"):  # 0.9 of 2 tokens keeps 2; 0.4 would keep 1
        ts.generate(tiny, [ref], "place", steps=1, guidance=ts.SparseGuidanceConfig(2.0, 0.0, 0.0, weak_keep=0.9))
    ts.remove_sparse_context(tiny)
