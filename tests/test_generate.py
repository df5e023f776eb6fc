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
