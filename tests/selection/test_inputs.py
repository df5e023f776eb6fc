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
