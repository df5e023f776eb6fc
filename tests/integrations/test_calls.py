import torch
from torch import nn

from tokensparse.integrations.calls import as_keywords, first_arg


class Net(nn.Module):
    def forward(self, hidden_states, timestep=None, *, img_ids=None, **kwargs):
        return hidden_states


def test_positional_and_keyword_calls_read_the_same():
    net, x, t = Net(), torch.zeros(1), torch.ones(1)
    assert as_keywords(net, (x, t), {"img_ids": 3}) == {"hidden_states": x, "timestep": t, "img_ids": 3}
    assert as_keywords(net, (x,), {"extra": 1}) == {"hidden_states": x, "extra": 1}  # **kwargs flattened
    assert first_arg(as_keywords(net, (x, t), {}), "timestep") is t
    assert first_arg(as_keywords(net, (), {"timestep": t}), "timestep") is t
    assert first_arg(as_keywords(net, (x,), {"timestep": None}), "timestep", "hidden_states") is x  # None skipped
    assert first_arg(as_keywords(net, (x,), {}), "sample") is None
