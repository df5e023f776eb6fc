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
