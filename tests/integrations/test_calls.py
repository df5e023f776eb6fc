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


def test_a_torch_compile_wrapper_names_arguments_by_the_wrapped_forward():
    from tokensparse.integrations.calls import positional_names

    net, x, t = Net(), torch.zeros(1), torch.ones(1)
    compiled = torch.compile(net, backend="eager")  # OptimizedModule.forward(*args, **kwargs); nothing compiles here
    assert as_keywords(compiled, (x, t), {"img_ids": 3}) == {"hidden_states": x, "timestep": t, "img_ids": 3}
    assert positional_names(compiled, 2) == ["hidden_states", "timestep"]
