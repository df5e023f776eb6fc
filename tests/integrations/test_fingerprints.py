"""Call fingerprints and gradient checkpointing's records (:mod:`tokensparse.integrations.fingerprints`)."""

from __future__ import annotations

import torch

from tokensparse.integrations.fingerprints import call_key


def test_call_key_tells_calls_apart_by_every_value() -> None:
    """Equal for equal arguments; different where any value differs: a tensor of at most 16 values is sampled whole,
    a longer one also counts by its sum (and, for ids, a position-weighted sum: a permutation differs)."""
    x = torch.randn(2, 40)
    ids, short = torch.arange(30)[None], torch.arange(16)[None]
    base = {"x": x, "t": torch.tensor([0.5]), "ids": ids, "short": short, "n": 3, "obj": None}
    key = call_key(base)
    assert call_key({**base, "x": x.clone(), "ids": ids.clone()}) == key
    unsampled = x.clone()
    unsampled[0, 1] += 1.0  # not one of the 16 sampled values: the sum tells
    swapped, swapped_short = ids.clone(), short.clone()
    swapped[0, [1, 2]] = swapped[0, [2, 1]]
    swapped_short[0, [1, 2]] = swapped_short[0, [2, 1]]
    for change in ({"x": unsampled}, {"ids": swapped}, {"short": swapped_short}, {"t": torch.tensor([0.25])},
                   {"n": 4}, {"x": x.double()}, {"x": x[:1]}):
        assert call_key({**base, **change}) != key, change
    grad = torch.randn(2, 40, requires_grad=True)
    assert call_key({"x": grad}) == call_key({"x": grad.detach().clone()})  # no graph recorded, values only
