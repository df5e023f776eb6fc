"""Arguments of the selection layer: RefView, select, keep_mask and sparsify refuse what they cannot use, by name."""

import pytest
import torch

from tokensparse.selection import RefView, auto_choice


def plain(b: int = 2) -> torch.Tensor:
    """Features of a subject on a plain background (``auto`` without a prompt picks ``foreground``)."""
    f = torch.full((b, 4, 4, 3), 0.5)
    f[:, 1:3, 1:3] = torch.rand(b, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    return f


def test_refview_refuses_a_single_prompt_string():
    # a str was read character by character: no sample's prompt named its task, "auto" fell back to the image rule
    with pytest.raises(TypeError, match=r"prompts.*pass \[prompt\]"):
        RefView(plain(), prompts="recolor the object red")
    assert auto_choice(RefView(plain(), prompts=["recolor the object red"] * 2)) == ["uniform", "uniform"]


def test_refview_wants_one_prompt_per_sample():
    with pytest.raises(ValueError, match="1 prompts for a batch of 2"):  # sample 1 silently had no prompt
        RefView(plain(), prompts=["recolor the object red"])
    with pytest.raises(TypeError, match="prompts"):
        RefView(plain(), prompts=["recolor", 3])


@pytest.mark.parametrize("kwargs, err, match", [
    ({"features": torch.rand(2, 4, 4)}, ValueError, r"features must be \(B, h, w, C\)"),
    ({"features": [[0.5]]}, TypeError, "features must be a tensor"),
    ({"features": plain(), "image": torch.rand(3, 3, 16, 16)}, ValueError, "image must be None or"),
    ({"features": plain(), "image": torch.rand(3, 16, 16)}, ValueError, "image must be None or"),
    ({"features": plain(), "attention": torch.rand(2, 4, 5)}, ValueError, r"attention must be None or a \(B=2"),
])
def test_refview_refuses_shapes_scorers_would_fail_on(kwargs, err, match):
    with pytest.raises(err, match=match):
        RefView(**kwargs)


def test_refview_takes_what_the_wirings_give():
    v = RefView(plain(), image=torch.rand(2, 3, 16, 16), index=1, prompts=("place the subject", ""),
                attention=torch.rand(2, 4, 4))
    assert v.batch == 2 and v.grid == (4, 4)
    assert RefView(plain(1), prompts=["compose"]).prompts == ["compose"]


def test_attention_set_after_construction_is_checked_when_scored():
    from tokensparse.selection import SCORERS

    v = RefView(plain())
    v.attention = torch.rand(2, 3, 3)  # the probe fills it in later; a wrong shape failed in a reshape
    with pytest.raises(ValueError, match="attention"):
        SCORERS["attention"](v, torch.Generator())


def views(b: int = 2) -> list[RefView]:
    return [RefView(plain(b), index=0), RefView(torch.rand(b, 4, 4, 3, generator=torch.Generator().manual_seed(1)),
                                                   index=1)]


@pytest.mark.parametrize("kwargs, err, match", [
    ({"keep": 0.0}, ValueError, "keep"),  # kept 1 token per reference, silently
    ({"keep": -0.5}, ValueError, "keep"),
    ({"keep": 1.5}, ValueError, "keep"),  # kept every token, silently
    ({"keep": float("nan")}, ValueError, "keep"),  # cannot convert float NaN to integer
    ({"keep": "0.5"}, TypeError, "keep"),  # type str doesn't define __round__
    ({"keep": True}, TypeError, "keep"),
    ({"min_keep": 2.0}, ValueError, "min_keep"),
    ({"min_keep": float("nan")}, ValueError, "min_keep"),
    ({"mass": 1.5}, ValueError, "mass"),
    ({"adaptive": "yes", "selector": "edges"}, TypeError, "adaptive"),  # truthy: read as an adaptive budget
    ({"selector": 3}, TypeError, "selector"),
])
def test_select_refuses_budgets_by_name(kwargs, err, match):
    from tokensparse.selection import select

    kw = {"keep": 0.5, "selector": "random", **kwargs}
    keep, selector = kw.pop("keep"), kw.pop("selector")
    with pytest.raises(err, match=match):
        select(views(), keep, selector, torch.Generator(), **kw)


def test_select_refuses_views_it_cannot_concatenate():
    from tokensparse.selection import select

    g = torch.Generator()
    with pytest.raises(TypeError, match="views must be a list of RefView"):
        select(views()[0], 0.5, "random", g)  # 'RefView' object is not iterable
    with pytest.raises(TypeError, match=r"views\[0\] must be a RefView"):
        select([plain()], 0.5, "uniform", g)  # 'Tensor' object has no attribute 'grid'
    with pytest.raises(ValueError, match=r"views\[1\] has a batch of 3"):
        select([views()[0], views(3)[1]], 0.5, "edges", g)  # a size mismatch in torch.cat
    assert select(views(), 1.0, "random", g).all() and int(select(views(), 0.001, "uniform", g).sum()) == 4


def test_keep_mask_and_sparsify_check_the_config_again():
    from tokensparse.context import SparseContextConfig, keep_mask, sparsify
    from tokensparse.tokens import dense_seq

    cfg = SparseContextConfig(keep=0.25, selector="foreground")
    cfg.keep = 1.5  # an edit after construction: every token was kept, silently
    with pytest.raises(ValueError, match="keep"):
        keep_mask(views(), cfg)
    cfg = SparseContextConfig(keep=0.25, selector="foreground")
    cfg.adaptive, cfg.allocate = True, "score"  # a pair the constructor refuses
    seq = dense_seq([torch.zeros(2, 4, 4, 8), torch.zeros(2, 4, 4, 8)])
    with pytest.raises(ValueError, match="allocate='score'"):
        sparsify(seq, views(), cfg)
    with pytest.raises(TypeError, match="cfg must be a SparseContextConfig"):
        keep_mask(views(), {"keep": 0.25})  # 'dict' object has no attribute 'seed'
    cfg = SparseContextConfig(keep=0.25, selector="foreground")
    assert keep_mask(views(), cfg).sum(1).tolist() == [8, 8] and cfg.keep == 0.25


def test_reference_sizes_wants_a_mask_over_exactly_the_views_tokens():
    from tokensparse.context import reference_sizes

    keep = torch.zeros(2, 32, dtype=torch.bool)
    keep[:, ::4] = True
    sizes = reference_sizes(views(), keep)
    assert sizes.shape == (2, 32) and sizes.sum(1).tolist() == [32.0, 32.0]
    with pytest.raises(ValueError, match="over the views' 32 tokens"):  # extra columns were ignored, silently
        reference_sizes(views(), torch.ones(2, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match="over the views' 32 tokens"):
        reference_sizes(views(), torch.ones(2, 24, dtype=torch.bool))
